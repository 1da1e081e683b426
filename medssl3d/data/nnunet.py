"""The nnU-Net raw-data layout (v1 and v2) and the Medical Segmentation Decathlon's, read as cases.

A dataset folder of that layout looks like this::

    Dataset001_Prostate/
      dataset.json                 channel_names (v2) or modality (v1, Decathlon), labels, numTraining,
                                   file_ending (v2; ".nii.gz" otherwise)
      imagesTr/case01_0000.nii.gz  channel 0 of case "case01" (channel suffix _XXXX)
      imagesTr/case01_0001.nii.gz  channel 1 of the same case
      labelsTr/case01.nii.gz
      imagesTs/case07_0000.nii.gz  held-out test cases
      labelsTs/case07.nii.gz       (optional; not part of nnU-Net, but common)

The Decathlon's own tasks store every channel of a case in one 4D file without a channel suffix
(``imagesTr/case01.nii.gz``); such folders are read the same way, one file per case. ``labels`` maps
names to values in nnU-Net v2 (``{"background": 0, "liver": 1}``) and values to names in v1 and the
Decathlon (``{"0": "background", "1": "liver"}``); :func:`decathlon_labels` reads either.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from medssl3d.data.errors import DatalistError, InputError

logger = logging.getLogger(__name__)

DATASET_JSON = "dataset.json"
#: Keys only the dataset.json of nnU-Net or the Decathlon has (a medssl3d datalist has neither).
NNUNET_KEYS = ("numTraining", "channel_names")
#: nnU-Net v1 and the Decathlon store NIfTI only; v2 names its ending in ``file_ending``.
DEFAULT_FILE_ENDING = ".nii.gz"
#: (images folder, labels folder) of each split the layout holds.
SPLIT_FOLDERS = {"training": ("imagesTr", "labelsTr"), "test": ("imagesTs", "labelsTs")}
CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
#: How many file names a warning lists before it only counts.
MAX_LISTED = 10


@dataclass(frozen=True)
class NnunetCase:
    """One case of an nnU-Net folder.

    Args:
        subject: the case identifier (the file name without channel suffix and ending).
        image: the image file of the chosen channel (or the 4D file of a Decathlon task).
        label: the label map, or ``None`` when the case has none.
        split: ``"training"`` (``imagesTr``) or ``"test"`` (``imagesTs``).
    """

    subject: str
    image: Path
    label: Path | None
    split: str


@dataclass(frozen=True)
class NnunetScan:
    """What :func:`scan_nnunet` found.

    Args:
        name: the dataset's name (``name`` in dataset.json, else the folder's).
        modality: Decathlon modality map of the listed images, ``{"0": "T2"}``.
        labels: class value -> name (see :func:`decathlon_labels`); empty when dataset.json has none.
        cases: every case, training and test, sorted by split then subject.
        unmatched_labels: label files whose case has no image.
        notes: what a user should know about the listing (channel chosen, counts that disagree).
    """

    name: str
    modality: dict[str, str]
    labels: dict[str, str]
    cases: tuple[NnunetCase, ...]
    unmatched_labels: tuple[Path, ...]
    notes: tuple[str, ...]


def is_nnunet_root(root: str | os.PathLike) -> bool:
    """True when ``root`` holds ``imagesTr/`` and an nnU-Net / Decathlon ``dataset.json``.

    A medssl3d datalist saved as ``dataset.json`` has neither ``numTraining`` nor ``channel_names``,
    so a folder scanned once and given its datalist is still scanned as a plain folder.
    """
    root = Path(root)
    meta = root / DATASET_JSON
    if not (root / SPLIT_FOLDERS["training"][0]).is_dir() or not meta.is_file():
        return False
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and any(k in data for k in NNUNET_KEYS)


def read_dataset_json(path: str | os.PathLike) -> dict:
    """The JSON object of an nnU-Net / Decathlon ``dataset.json`` (or of a medssl3d datalist).

    Raises:
        InputError: naming the file, when it is missing, not JSON, or not an object.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise InputError(path, f"cannot read ({e.strerror})") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(path, f"not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise InputError(path, f"must hold a JSON object, got a {type(data).__name__}")
    return data


def _as_value(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def decathlon_labels(labels: object, source: str | os.PathLike) -> dict[str, str]:
    """Class value -> name, sorted by value, from ``labels`` in either orientation.

    nnU-Net v2 writes ``{"background": 0, "liver": 1}`` (name -> value); nnU-Net v1 and the Decathlon
    write ``{"0": "background", "1": "liver"}`` (value -> name). Both give ``{"0": "background", "1": "liver"}``.

    Args:
        labels: the ``labels`` object of a dataset.json or datalist.
        source: the file it came from, for messages.

    Raises:
        InputError: naming ``source``: not a non-empty object, mixed orientations, region-based labels
            (a name mapped to a list of values, which medssl3d does not train), or a value used twice.
    """
    if not isinstance(labels, Mapping) or not labels:
        raise InputError(source, f"'labels' must be a non-empty object of classes, got {labels!r}")
    if all(isinstance(v, str) and _as_value(k) is not None for k, v in labels.items()):
        pairs = [(_as_value(k), v) for k, v in labels.items()]
    elif all(_as_value(v) is not None and not isinstance(v, str) for v in labels.values()):
        pairs = [(_as_value(v), str(k)) for k, v in labels.items()]
    else:
        regions = [k for k, v in labels.items() if isinstance(v, (list, tuple))]
        if regions:
            raise InputError(
                source,
                f"'labels' are region-based ({', '.join(f'{k}: {labels[k]}' for k in regions)}); medssl3d trains "
                "one class per label value: list each value under its own name",
            )
        raise InputError(
            source,
            "'labels' must map names to values ({\"background\": 0, ...}, nnU-Net v2) or values to names "
            f'({{"0": "background", ...}}, Decathlon), got {dict(labels)!r}',
        )
    values = [v for v, _ in pairs]
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise InputError(source, f"'labels' gives value(s) {repeated} more than one name")
    return {str(v): name for v, name in sorted(pairs)}


def _channel_names(meta: Mapping, source: Path) -> dict[int, str]:
    names = meta.get("channel_names", meta.get("modality", {}))
    if not isinstance(names, Mapping) or any(_as_value(k) is None for k in names):
        raise InputError(source, f"'channel_names' / 'modality' must map channel numbers to names, got {names!r}")
    return {_as_value(k): str(v) for k, v in sorted(names.items(), key=lambda kv: _as_value(kv[0]))}


def _describe(names: Mapping[int, str]) -> str:
    return ", ".join(f"{c:04d}: {n}" for c, n in sorted(names.items()))


def _listed(paths) -> str:
    paths = list(paths)
    shown = ", ".join(str(p) for p in paths[:MAX_LISTED])
    return shown + (f" and {len(paths) - MAX_LISTED} more" if len(paths) > MAX_LISTED else "")


def _volume_files(folder: Path, ending: str) -> dict[str, Path]:
    """Stem -> file for every non-hidden file of ``folder`` that ends in ``ending``."""
    if not folder.is_dir():
        return {}
    return {
        p.name[: -len(ending)]: p
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.name.startswith(".") and p.name.endswith(ending)
    }


def scan_nnunet(root: str | os.PathLike, *, channel: int = 0, modality: str = "unknown") -> NnunetScan:
    """Read an nnU-Net (v1, v2) or Decathlon dataset folder as a list of cases.

    medssl3d models take one channel: for multi-channel datasets, each case is listed with its
    ``channel`` file only, and the scan says so in ``notes`` (and the log). Decathlon tasks, whose
    files hold every channel in one 4D volume, are listed as they are (``channel`` must be 0).

    Args:
        root: the dataset folder (with ``dataset.json`` and ``imagesTr/``).
        channel: the channel (file suffix ``_XXXX``) to list for each case.
        modality: the modality to write when dataset.json names no channel.

    Returns:
        The cases, the class names from ``labels``, and what a user should know.

    Raises:
        InputError: dataset.json unreadable or malformed, or ``channel`` not one of the channels it names.
            ``labels`` that :func:`decathlon_labels` refuses (e.g. region-based) are left out, with a note.
        DatalistError: listing every file without the channel suffix and every case that lacks
            ``channel``, together.
    """
    root = Path(root)
    meta_path = root / DATASET_JSON
    meta = read_dataset_json(meta_path)
    if "dataset" in meta:
        raise InputError(
            meta_path, "lists its files under 'dataset'; medssl3d reads the imagesTr/labelsTr folders only"
        )
    ending = str(meta.get("file_ending", DEFAULT_FILE_ENDING))
    names = _channel_names(meta, meta_path)
    notes = []
    try:
        labels = decathlon_labels(meta["labels"], meta_path) if "labels" in meta else {}
    except InputError as e:  # e.g. region-based: the images can still be listed (pretraining needs no classes)
        labels = {}
        notes.append(f"classes not listed: {e.problem}")
    suffixed = "channel_names" in meta or all(
        CHANNEL_SUFFIX.match(stem) for stem in _volume_files(root / SPLIT_FOLDERS["training"][0], ending)
    )
    if names and channel not in names:
        raise InputError(meta_path, f"no channel {channel}; the dataset has {_describe(names)}")
    if not suffixed and channel != 0:
        raise InputError(
            meta_path, f"channel {channel} asked for, but its images have no channel suffix (one file per case)"
        )

    cases: list[NnunetCase] = []
    unmatched: list[Path] = []
    problems: list[str] = []
    channels_seen: set[int] = set()
    for split, (image_dir, label_dir) in SPLIT_FOLDERS.items():
        by_case: dict[str, dict[int, Path]] = {}
        for stem, path in _volume_files(root / image_dir, ending).items():
            match = CHANNEL_SUFFIX.match(stem) if suffixed else None
            if suffixed and match is None:
                problems.append(f"{path}: no channel suffix _XXXX before {ending} (e.g. case_0000{ending})")
                continue
            case, ch = (match["case"], int(match["channel"])) if match else (stem, 0)
            by_case.setdefault(case, {})[ch] = path
        label_files = _volume_files(root / label_dir, ending)
        for case, files in sorted(by_case.items()):
            channels_seen.update(files)
            if channel not in files:
                found = ", ".join(p.name for _, p in sorted(files.items()))
                problems.append(f"{root / image_dir}: case {case!r} has no channel {channel:04d} (found {found})")
                continue
            cases.append(NnunetCase(case, files[channel], label_files.get(case), split))
        unmatched += [p for case, p in label_files.items() if case not in by_case]
    if problems:
        raise DatalistError(root, problems)

    channel_names = names or {c: f"channel {c}" for c in sorted(channels_seen)}
    if suffixed and len(channel_names) > 1:
        notes.append(
            f"{len(channel_names)} channels per case ({_describe(channel_names)}); listed channel {channel:04d} "
            f"({channel_names.get(channel, '?')}) only, as medssl3d models take one (choose another with --channel)"
        )
    elif not suffixed and len(names) > 1:
        notes.append(
            f"each image holds {len(names)} channels in one 4D file ({_describe(names)}); medssl3d loads one of "
            "them only when told which (allow_4d_index)"
        )
    training = [c for c in cases if c.split == "training"]
    unlabelled = [c.subject for c in training if c.label is None]
    if unlabelled:
        notes.append(f"{len(unlabelled)} training case(s) have no label in labelsTr: {_listed(unlabelled)}")
    n_training = _as_value(meta.get("numTraining"))
    if n_training is not None and n_training != len(training):
        notes.append(f"dataset.json says numTraining={n_training}, imagesTr holds {len(training)} case(s)")
    if unmatched:
        logger.warning(
            "%s: %d label file(s) match no image: %s",
            root,
            len(unmatched),
            ", ".join(str(p.relative_to(root)) for p in unmatched),
        )
    for note in notes:
        logger.warning("%s: %s", root, note)
    if suffixed:
        listed = {"0": names.get(channel, modality)}
    else:
        listed = {str(c): n for c, n in names.items()} or {"0": modality}
    return NnunetScan(
        name=str(meta.get("name", root.name)),
        modality=listed,
        labels=labels,
        cases=tuple(cases),
        unmatched_labels=tuple(unmatched),
        notes=tuple(notes),
    )
