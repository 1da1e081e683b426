"""Decathlon-style datalists: the format, written atomically, loaded and checked.

A datalist is a JSON object in the Medical Segmentation Decathlon layout::

    {
      "name": "my-study",
      "modality": {"0": "CT"},
      "labels": {"0": "background", "1": "liver"},
      "training":   [{"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz", "subject": "a"}, ...],
      "validation": [{"image": "b.nii.gz", "label": "b_seg.nii.gz", "subject": "b"}, ...],
      "unlabeled":  [{"image": "dicom/patient7", "subject": "patient7"},
                     {"image": "dicom/patient8", "series_uid": "1.2.3", "subject": "patient8"}, ...],
      "test":       [{"image": "imagesTs/c.nii.gz", "subject": "c"}, ...]
    }

Paths are relative to the folder holding the JSON file (or absolute). A DICOM series is a folder;
an entry for a folder that holds several series carries the UID of its series in ``series_uid``.
``subject`` names the case (pretraining leaves out listed subjects and every subject of ``test``);
``labels`` (class value -> name) is what the segmentation bundle trains unless told otherwise.
:func:`medssl3d.data.folder_scan.scan_folder` builds one from a folder tree.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from medssl3d.data.atomic_files import atomic_write_json
from medssl3d.data.errors import DatalistError, InputError
from medssl3d.data.readers import read_header
from medssl3d.data.validation import check_same_grid

logger = logging.getLogger(__name__)

#: Splits of a scanned datalist: ``unlabeled`` holds images without a label, ``test`` held-out cases.
SPLITS = ("training", "validation", "unlabeled", "test")
#: Keys whose values are file paths (resolved by :func:`load_datalist`).
IMAGE_KEY = "image"
LABEL_KEY = "label"
SERIES_UID_KEY = "series_uid"
SUBJECT_KEY = "subject"
DEFAULT_DATALIST_NAME = "dataset.json"
#: Checking a large datalist takes a while (one header per file): log progress this often.
VALIDATE_LOG_EVERY = 500
SPATIAL_DIMS = 3


def write_datalist(datalist: Mapping, path: str | os.PathLike) -> Path:
    """Write a datalist as JSON, atomically: a reader never sees a half-written file.

    The JSON goes to a temporary file in the target folder and is moved over ``path`` with
    :func:`os.replace` (atomic on POSIX and Windows within one file system).

    Args:
        datalist: the datalist (e.g. from :func:`~medssl3d.data.folder_scan.scan_folder`); must be JSON-serialisable.
        path: where to write; parent folders are created.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    return atomic_write_json(Path(path).expanduser(), datalist)


# ----------------------------------------------------------------------------------------------
# Loading and checking a datalist
# ----------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise InputError(path, "datalist file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(path, f"cannot read datalist: {e}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(path, f"malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
    if not isinstance(data, dict):
        raise InputError(path, f"a datalist must be a JSON object with split lists, got a {type(data).__name__}")
    return data


def _resolve(value: str, base: Path) -> str:
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p))


def _check_header(header, role: str, entry_id: str, *, min_shape, allow_4d_index) -> None:
    # A (256, 256, 1) file is a 2D slice however many axes it stores.
    extent = sum(int(n) > 1 for n in header.shape[:SPATIAL_DIMS])
    if header.ndim < SPATIAL_DIMS or extent < SPATIAL_DIMS:
        raise InputError(
            header.path,
            f"{entry_id} {role}: {extent}D image (shape {tuple(header.shape)}), expected a 3D volume",
        )
    if header.n_volumes > 1 and allow_4d_index is None:
        raise InputError(
            header.path,
            f"{entry_id} {role}: 4D image with {header.n_volumes} volumes; pass allow_4d_index to take one",
        )
    if min_shape is not None:
        spatial = tuple(header.shape[:SPATIAL_DIMS])
        if any(s < m for s, m in zip(spatial, min_shape, strict=True)):
            raise InputError(
                header.path,
                f"{entry_id} {role}: spatial shape {spatial} is smaller than min_shape {tuple(min_shape)}",
            )


def _check_entry(entry: dict, entry_id: str, keys: Sequence[str], *, min_shape, allow_4d_index) -> None:
    """Raise the first problem of one (already resolved) entry as an InputError."""
    series_uid = entry.get(SERIES_UID_KEY)
    headers = {}
    for key in keys:
        path = entry[key]
        if not os.path.exists(path):
            raise InputError(path, f"{entry_id} {key!r}: file not found")
        # series_uid names a series of the image folder; labels are single files.
        uid = series_uid if key == keys[0] else None
        try:
            header = read_header(path, series_uid=uid)
        except InputError as e:
            raise InputError(e.path, f"{entry_id} {key!r}: {e.problem}") from e
        except OSError as e:  # e.g. permission denied: a bad case, not a reason to stop a long run
            raise InputError(path, f"{entry_id} {key!r}: cannot read ({e})") from e
        _check_header(header, repr(key), entry_id, min_shape=min_shape, allow_4d_index=allow_4d_index)
        headers[key] = header
    image_header = headers[keys[0]]
    for key in keys[1:]:
        try:
            check_same_grid(image_header, headers[key])
        except InputError as e:
            raise InputError(e.path, f"{entry_id} {key!r}: {e.problem}") from e


def load_datalist_report(
    path: str | os.PathLike,
    *,
    splits: str | Sequence[str] = ("training",),
    keys: str | Sequence[str] = ("image", "label"),
    validate: bool = True,
    min_shape: Sequence[int] | int | None = None,
    base_dir: str | os.PathLike | None = None,
    allow_4d_index: int | None = None,
) -> tuple[list[dict], list[tuple[dict, str]]]:
    """Load a datalist and sort its entries into good and bad ones, without raising for bad entries.

    Meant for long runs that should skip (and list) broken cases instead of dying. Problems with the
    datalist as a whole (missing or malformed file, missing split, no entries) still raise.

    Args:
        path: the datalist JSON file.
        splits: split names to load, in order (e.g. ``("training", "validation", "unlabeled")``).
        keys: keys every entry must have; their values are paths, resolved to absolute paths. The first
            key is the image; the others (labels) must lie on the image's voxel grid.
        validate: check every file (exists, header readable with :func:`~medssl3d.data.readers.read_header`,
            3D, on the image grid, at least ``min_shape``). ``False`` checks only the JSON structure.
        min_shape: smallest spatial size in voxels, in the axis order :func:`read_header` reports (the
            loaded array order), or one int for all axes.
        base_dir: folder relative paths are resolved against; defaults to the datalist's folder.
        allow_4d_index: accept 4D images (the loader will take this volume index); ``None`` refuses them.

    Returns:
        ``(good, bad)``: ``good`` is a list of entries (copies, with ``keys`` resolved to absolute paths
        and other fields such as ``"series_uid"`` kept); ``bad`` is a list of ``(entry, reason)``.
        A plain string entry (Decathlon's ``"test"`` lists) is read as ``{"image": path}``.

    Raises:
        InputError: if the file is missing or not valid JSON (the message gives line and column), a split
            is missing or not a list, or the requested splits hold no entry.
        ValueError: if ``splits`` or ``keys`` is empty.
    """
    path = Path(path).expanduser()
    splits = (splits,) if isinstance(splits, str) else tuple(splits)
    keys = (keys,) if isinstance(keys, str) else tuple(keys)
    if not splits:
        raise ValueError("splits must name at least one split")
    if not keys:
        raise ValueError("keys must name at least one key (the image)")
    if isinstance(min_shape, int):
        min_shape = (min_shape,) * SPATIAL_DIMS
    if min_shape is not None and len(min_shape) != SPATIAL_DIMS:
        raise ValueError(f"min_shape must be an int or {SPATIAL_DIMS} ints, got {min_shape!r}")
    data = _read_json(path)
    base = Path(base_dir).expanduser() if base_dir is not None else path.parent
    base = base.resolve()

    entries: list[tuple[str, object]] = []
    for split in splits:
        if split not in data:
            available = [k for k, v in data.items() if isinstance(v, list)]
            raise InputError(path, f"no split {split!r} in the datalist (it has: {', '.join(available) or 'none'})")
        if not isinstance(data[split], list):
            raise InputError(path, f"split {split!r} must be a list, got a {type(data[split]).__name__}")
        entries.extend((f"{split}[{i}]", e) for i, e in enumerate(data[split]))
    if not entries:
        raise InputError(path, f"empty datalist: no entries in {', '.join(map(repr, splits))}")

    good: list[dict] = []
    bad: list[tuple[dict, str]] = []
    for n_done, (entry_id, raw) in enumerate(entries, start=1):
        if validate and n_done % VALIDATE_LOG_EVERY == 0:
            logger.info("%s: checked %d of %d cases (%d bad so far)", path, n_done, len(entries), len(bad))
        entry = {IMAGE_KEY: raw} if isinstance(raw, str) else raw
        if not isinstance(entry, dict):
            bad.append(({"entry": raw}, str(InputError(path, f"{entry_id}: not an object or a path"))))
            continue
        entry = dict(entry)
        missing = [k for k in keys if not isinstance(entry.get(k), str) or not entry.get(k)]
        if missing:
            problem = f"{entry_id}: missing or non-string path for key(s) {', '.join(map(repr, missing))}"
            bad.append((entry, str(InputError(path, problem))))
            continue
        for key in keys:
            entry[key] = _resolve(entry[key], base)
        if validate:
            try:
                _check_entry(entry, entry_id, keys, min_shape=min_shape, allow_4d_index=allow_4d_index)
            except InputError as e:
                bad.append((entry, str(e)))
                continue
        good.append(entry)
    return good, bad


def load_datalist(
    path: str | os.PathLike,
    *,
    splits: str | Sequence[str] = ("training",),
    keys: str | Sequence[str] = ("image", "label"),
    validate: bool = True,
    skip_bad: bool = False,
    min_shape: Sequence[int] | int | None = None,
    base_dir: str | os.PathLike | None = None,
    allow_4d_index: int | None = None,
) -> list[dict]:
    """Load the entries of a datalist with absolute paths, checking every entry up front.

    With ``validate=True`` every entry is checked before anything is returned (see
    :func:`load_datalist_report`), and all problems are raised together in one :class:`DatalistError`,
    so a user fixes a datalist in one pass rather than one crash at a time.

    Args:
        path: the datalist JSON file.
        splits: split names to load, concatenated in this order.
        keys: keys every entry must have (first = image, others = labels on the image grid).
        validate: check files and headers (see :func:`load_datalist_report`).
        skip_bad: log and drop bad entries instead of raising; use :func:`load_datalist_report` to get the
            list of dropped entries.
        min_shape: smallest spatial size in voxels (axis order as :func:`read_header` reports), or an int.
        base_dir: folder relative paths are resolved against; defaults to the datalist's folder.
        allow_4d_index: accept 4D images (the loader takes this volume index); ``None`` refuses them.

    Returns:
        The good entries, in datalist order, with ``keys`` as absolute paths.

    Raises:
        InputError: missing/malformed file, missing split, empty datalist.
        DatalistError: bad entries (listing every one), unless ``skip_bad``; with ``skip_bad``, only
            when no entry is good.
    """
    good, bad = load_datalist_report(
        path,
        splits=splits,
        keys=keys,
        validate=validate,
        min_shape=min_shape,
        base_dir=base_dir,
        allow_4d_index=allow_4d_index,
    )
    if bad and (not skip_bad or not good):
        raise DatalistError(path, [reason for _, reason in bad])
    for _, reason in bad:
        logger.warning("skipping bad case: %s", reason)
    if bad:
        logger.warning("%s: skipped %d of %d cases", path, len(bad), len(good) + len(bad))
    return good
