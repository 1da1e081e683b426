"""Decathlon-style datalists: build one from a folder tree, write it atomically, load and check it.

A datalist is a JSON object in the Medical Segmentation Decathlon layout::

    {
      "name": "my-study",
      "modality": {"0": "CT"},
      "training":   [{"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz"}, ...],
      "validation": [{"image": "b.nii.gz", "label": "b_seg.nii.gz"}, ...],
      "unlabeled":  [{"image": "dicom/patient7"}, {"image": "dicom/patient8", "series_uid": "1.2.3"}, ...]
    }

Paths are relative to the folder holding the JSON file (or absolute). A DICOM series is a folder;
an entry for a folder that holds several series carries the UID of its series in ``series_uid``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import SimpleITK as sitk

from medssl3d.data.errors import DatalistError, InputError
from medssl3d.data.readers import read_header
from medssl3d.data.validation import check_same_grid

logger = logging.getLogger(__name__)

#: File name endings read as volumes (longest first so ".nii.gz" wins over ".gz"-less ".nii").
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
#: Preferred ending when looking for a label beside an image (then the image's own, then the rest).
DEFAULT_LABEL_EXT = ".nii.gz"
#: Sibling folder pairs (image folder -> label folder) for the Decathlon / "images + labels" layouts.
LABEL_FOLDER_PAIRS = (("imagesTr", "labelsTr"), ("images", "labels"))
#: A DICOM Part 10 file has a 128-byte preamble followed by these four bytes.
DICOM_MAGIC = b"DICM"
DICOM_MAGIC_OFFSET = 128
#: Splits written by :func:`scan_folder`; ``unlabeled`` holds images without a label.
SPLITS = ("training", "validation", "unlabeled")
#: Keys whose values are file paths (resolved by :func:`load_datalist`).
IMAGE_KEY = "image"
SERIES_UID_KEY = "series_uid"
DEFAULT_DATALIST_NAME = "dataset.json"
JSON_INDENT = 2
#: Checking a large datalist takes a while (one header per file): log progress this often.
VALIDATE_LOG_EVERY = 500
SPATIAL_DIMS = 3


# ----------------------------------------------------------------------------------------------
# Building a datalist from a folder
# ----------------------------------------------------------------------------------------------


def _volume_suffix(name: str) -> str | None:
    lower = name.lower()
    return next((s for s in VOLUME_SUFFIXES if lower.endswith(s)), None)


def _is_dicom_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(DICOM_MAGIC_OFFSET + len(DICOM_MAGIC))
    except OSError:
        return False
    return head[DICOM_MAGIC_OFFSET:] == DICOM_MAGIC


def _find_label(image: Path, stem: str, ext: str, label_suffix: str, label_folders: Sequence) -> Path | None:
    """The label of ``image``: ``<stem><label_suffix><ext>`` beside it, else its name in a label folder."""
    for cand_ext in dict.fromkeys((DEFAULT_LABEL_EXT, ext, *VOLUME_SUFFIXES)):
        cand = image.with_name(f"{stem}{label_suffix}{cand_ext}")
        if cand.is_file():
            return cand
    for image_dir, label_dir in label_folders:
        if image.parent.name == image_dir:
            cand = image.parent.parent / label_dir / image.name
            if cand.is_file():
                return cand
    return None


def _dicom_series(folder: Path) -> tuple[str, ...]:
    # GDCM groups the files of a folder by SeriesInstanceUID; sort so the datalist is reproducible.
    return tuple(sorted(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))))


def _case_key(case: Mapping) -> tuple[str, str]:
    return case[IMAGE_KEY], case.get(SERIES_UID_KEY, "")


def _split_rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def split_cases(cases: Sequence[dict], *, val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Split cases into training and validation, deterministically by ``seed``.

    Each case gets a rank from a hash of (seed, image path, series UID), and the ``round(val_fraction * n)``
    lowest ranks go to validation (at least one and at most ``n - 1`` when ``val_fraction > 0`` and
    ``n >= 2``). The split therefore depends neither on the order of ``cases`` nor on the file system,
    and adding a case moves at most one existing case from validation to training.

    Args:
        cases: datalist entries with an ``"image"`` key.
        val_fraction: fraction of cases for validation, in ``[0, 1)``.
        seed: any integer; a different seed gives a different split.

    Returns:
        ``(training, validation)``, each sorted by image path.

    Raises:
        ValueError: if ``val_fraction`` is outside ``[0, 1)``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    n = len(cases)
    n_val = round(val_fraction * n)
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    ranked = sorted(cases, key=lambda c: _split_rank(seed, "|".join(_case_key(c))))
    return sorted(ranked[n_val:], key=_case_key), sorted(ranked[:n_val], key=_case_key)


def scan_folder(
    root: str | os.PathLike,
    *,
    label_suffix: str = "_seg",
    val_fraction: float = 0.2,
    seed: int = 0,
    label_folders: Sequence[tuple[str, str]] = LABEL_FOLDER_PAIRS,
    relative_to: str | os.PathLike | None = None,
    name: str | None = None,
    modality: str = "unknown",
) -> dict:
    """Walk a folder tree and build a Decathlon-style datalist of every case in it.

    What counts as a case:
        * a NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``) or MetaImage (``.mha``, ``.mhd``) file;
        * a DICOM series: a folder holding DICOM files (found by the ``DICM`` magic at byte 128), grouped
          into series by SimpleITK/GDCM. A folder with one series gives one entry ``{"image": folder}``;
          a folder with several gives one entry per series, each with its ``"series_uid"``.

    How labels are found (first match wins):
        1. ``<stem><label_suffix>.<ext>`` beside the image (default ``case_seg.nii.gz`` for ``case.nii.gz``,
           and ``patient7_seg.nii.gz`` beside the DICOM folder ``patient7/``);
        2. a file with the image's own name in a sibling label folder: ``images/x.nii.gz`` ->
           ``labels/x.nii.gz`` and ``imagesTr/x.nii.gz`` -> ``labelsTr/x.nii.gz`` (``label_folders``).

        Files ending in ``<label_suffix>`` and everything under a label folder are never images.
        A folder holding several DICOM series gets no label (which series it would belong to is
        ambiguous); its entries are unlabeled.

    Where cases go:
        Labelled cases are split into ``"training"`` and ``"validation"`` by :func:`split_cases`
        (deterministic for a given ``seed``). Cases without a label go to a separate ``"unlabeled"``
        list, so every ``"training"`` / ``"validation"`` entry has a ``"label"``; pretraining loads
        all three splits with ``keys=("image",)``.

    Args:
        root: the folder to scan (recursively; hidden files and folders are skipped).
        label_suffix: suffix of a label's stem, e.g. ``"_seg"`` or ``"_label"``.
        val_fraction: fraction of labelled cases for validation, in ``[0, 1)``.
        seed: seed of the train/validation split.
        label_folders: ``(image_folder_name, label_folder_name)`` pairs for rule 2; empty to disable it.
        relative_to: folder the paths are written relative to; defaults to ``root``, i.e. the datalist
            is meant to be written as ``root/dataset.json``. Paths use ``/`` on every platform.
        name: the datalist's ``"name"``; defaults to the folder name of ``root``.
        modality: stored as ``{"0": modality}`` (Decathlon's per-channel modality map).

    Returns:
        ``{"name", "modality", "training", "validation", "unlabeled"}``; each list is sorted by path.

    Raises:
        InputError: if ``root`` is not a folder or holds no readable case.
        ValueError: if ``val_fraction`` is outside ``[0, 1)`` or ``label_suffix`` is empty.
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise InputError(root, "not a folder")
    if not label_suffix:
        raise ValueError("label_suffix must not be empty")
    base = Path(relative_to).expanduser().resolve() if relative_to is not None else root

    def rel(p: Path) -> str:
        return Path(os.path.relpath(p, base)).as_posix()

    label_dir_names = {label_dir for _, label_dir in label_folders}

    labelled: list[dict] = []
    unlabeled: list[dict] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Sorting in place makes os.walk visit folders in a reproducible order.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in label_dir_names)
        folder = Path(dirpath)
        has_dicom = False
        for fname in sorted(filenames):
            if fname.startswith("."):
                continue
            ext = _volume_suffix(fname)
            if ext is None:
                has_dicom = has_dicom or _is_dicom_file(folder / fname)
                continue
            stem = fname[: -len(ext)]
            if stem.endswith(label_suffix):
                continue
            image = folder / fname
            label = _find_label(image, stem, ext, label_suffix, label_folders)
            entry = {IMAGE_KEY: rel(image)}
            if label is None:
                unlabeled.append(entry)
            else:
                labelled.append({**entry, "label": rel(label)})
        if not has_dicom:
            continue
        series = _dicom_series(folder)
        if not series:
            logger.warning("%s: holds DICOM files but no image series; skipped", folder)
        elif len(series) == 1:
            label = None if folder == root else _find_label(folder, folder.name, "", label_suffix, ())
            entry = {IMAGE_KEY: rel(folder)}
            if label is None:
                unlabeled.append(entry)
            else:
                labelled.append({**entry, "label": rel(label)})
        else:
            unlabeled.extend({IMAGE_KEY: rel(folder), SERIES_UID_KEY: uid} for uid in series)

    if not labelled and not unlabeled:
        raise InputError(
            root, f"no images found (looked for {', '.join(VOLUME_SUFFIXES)} files and DICOM series)"
        )
    training, validation = split_cases(labelled, val_fraction=val_fraction, seed=seed)
    unlabeled.sort(key=_case_key)
    logger.info(
        "%s: %d labelled (%d training, %d validation), %d unlabeled",
        root,
        len(labelled),
        len(training),
        len(validation),
        len(unlabeled),
    )
    return {
        "name": name if name is not None else root.name,
        "modality": {"0": modality},
        "training": training,
        "validation": validation,
        "unlabeled": unlabeled,
    }


def write_datalist(datalist: Mapping, path: str | os.PathLike) -> Path:
    """Write a datalist as JSON, atomically: a reader never sees a half-written file.

    The JSON goes to a temporary file in the target folder and is moved over ``path`` with
    :func:`os.replace` (atomic on POSIX and Windows within one file system).

    Args:
        datalist: the datalist (e.g. from :func:`scan_folder`); must be JSON-serialisable.
        path: where to write; parent folders are created.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(datalist, indent=JSON_INDENT) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
        raise InputError(
            path, f"a datalist must be a JSON object with split lists, got a {type(data).__name__}"
        )
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
            raise InputError(
                path, f"no split {split!r} in the datalist (it has: {', '.join(available) or 'none'})"
            )
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
