"""The classes of a segmentation bundle: from the datalist's ``labels``, else its ``metadata.json``; and their check.

Configs read them through these functions rather than ``@_meta_#...``: MONAI Label parses ``inference.json``
and ``train.json`` without the metadata, so a ``_meta_`` reference would not resolve there.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from medssl3d.data.datalist import LABEL_KEY, load_datalist, load_datalist_report
from medssl3d.data.errors import DatalistError, InputError
from medssl3d.data.nnunet import decathlon_labels, read_dataset_json
from medssl3d.data.readers import load_array

logger = logging.getLogger(__name__)

CHANNEL_DEF_PATH = ("network_data_format", "outputs", "pred", "channel_def")
#: The splits whose label maps are checked before training (those a datalist holds).
CHECKED_SPLITS = ("training", "validation")
#: How many offending values of one file a message lists.
MAX_VALUES_LISTED = 8


def channel_def(metadata_file: str | os.PathLike) -> dict[str, str]:
    """``network_data_format.outputs.pred.channel_def`` of a bundle's metadata: channel index → label name.

    Raises:
        InputError: the file is missing, not JSON, or has no such mapping (the message names the file).
    """
    path = Path(metadata_file)
    try:
        node = json.loads(path.read_text())
    except OSError as e:
        raise InputError(path, f"cannot read the bundle metadata: {e.strerror}") from e
    except ValueError as e:
        raise InputError(path, f"not valid JSON: {e}") from e
    for key in CHANNEL_DEF_PATH:
        if not isinstance(node, dict) or key not in node:
            raise InputError(path, f"no {'.'.join(CHANNEL_DEF_PATH)} (the bundle's label names)")
        node = node[key]
    if not isinstance(node, dict) or not node:
        raise InputError(path, f"{'.'.join(CHANNEL_DEF_PATH)} must map channel indices to label names")
    return {str(k): str(v) for k, v in node.items()}


def default_label_names(datalist: str | os.PathLike, metadata_file: str | os.PathLike) -> dict[str, str]:
    """The bundle's classes: the ``labels`` of ``datalist`` when it has them, else the metadata ``channel_def``.

    ``datalist`` may be a medssl3d datalist or an nnU-Net / Decathlon ``dataset.json``: ``labels`` is read
    in either orientation (name → value or value → name, see :func:`~medssl3d.data.nnunet.decathlon_labels`).
    A datalist that does not exist yet (MONAI Label, ``verify_bundle``) or has no ``labels`` leaves the
    metadata's classes.

    Args:
        datalist: the training datalist (or dataset.json) path.
        metadata_file: the bundle's ``metadata.json``.

    Returns:
        Class value → name, ``{"0": "background", "1": ...}``, values ``0 .. K-1``.

    Raises:
        InputError: naming the file: unreadable, ``labels`` malformed, values not ``0 .. K-1`` or fewer than
            two classes, or an nnU-Net ``ignore`` label (medssl3d's losses have no ignored class).
    """
    path = Path(datalist)
    labels = read_dataset_json(path).get("labels") if path.is_file() else None
    if labels is None:
        logger.info("classes from %s (%s has no 'labels')", metadata_file, path)
        return channel_def(metadata_file)
    names = decathlon_labels(labels, path)
    if [int(v) for v in names] != list(range(len(names))) or len(names) < 2:
        raise InputError(path, f"'labels' must number two or more classes 0, 1, ..., K-1, got {names}")
    if "ignore" in names.values():
        raise InputError(path, "has an nnU-Net 'ignore' label; medssl3d trains every value as a class")
    logger.info("classes from %s: %s", path, names)
    return names


@functools.cache
def _label_values(path: str, size: int, mtime_ns: int) -> tuple[float, ...]:
    # size and mtime key the cache: a label map rewritten in place is read again.
    array, _ = load_array(path)
    return tuple(np.unique(np.asarray(array)).tolist())


def _describe(values: Sequence[float]) -> str:
    shown = ", ".join(f"{v:g}" for v in values[:MAX_VALUES_LISTED])
    return shown + (f" ... ({len(values)} values)" if len(values) > MAX_VALUES_LISTED else "")


def check_label_values(
    datalist: str | os.PathLike, label_names: Mapping[str, str], *, splits: Sequence[str] = CHECKED_SPLITS
) -> None:
    """Check that every label map of ``splits`` holds only the values of ``label_names``.

    Each label file is read once per process (the values are cached by path, size and modification
    time), so a second check of the same datalist (another run, evaluation) reads nothing again.

    Args:
        datalist: the datalist JSON; of ``splits``, those it holds are checked.
        label_names: class value → name, as :func:`default_label_names` returns.
        splits: the splits whose labels are checked.

    Raises:
        DatalistError: one error listing every bad entry of the datalist (missing or unreadable files,
            labels off the image grid) and every label file with values that are not classes, naming the
            values.
    """
    path = Path(datalist)
    present = [s for s in splits if read_dataset_json(path).get(s)]
    if not present:
        return
    good, bad = load_datalist_report(path, splits=present)
    problems = [reason for _, reason in bad]
    classes = {float(v) for v in label_names}
    for label in dict.fromkeys(entry[LABEL_KEY] for entry in good):
        stat = os.stat(label)
        try:
            values = _label_values(label, stat.st_size, stat.st_mtime_ns)
        except InputError as e:
            problems.append(str(e))
            continue
        foreign = [v for v in values if v not in classes]
        if foreign:
            problems.append(
                f"{label}: value(s) {_describe(foreign)} are not among the {len(classes)} classes "
                f"{dict(label_names)} (set label_names or the datalist's 'labels')"
            )
    if problems:
        raise DatalistError(path, problems)


def checked_split(
    datalist: str | os.PathLike,
    label_names: Mapping[str, str],
    split: str,
    *,
    checked_splits: Sequence[str] = CHECKED_SPLITS,
) -> list[dict]:
    """The entries of one split (as :func:`~medssl3d.data.datalist.load_datalist` gives them), once checked.

    The bundle's training dataset reads its data through this, so the labels of every split in
    ``checked_splits`` are checked (:func:`check_label_values`) before anything is cached or trained,
    under ``python -m monai.bundle run`` and in-process workflows alike.

    Raises:
        DatalistError: as :func:`check_label_values` and :func:`~medssl3d.data.datalist.load_datalist`.
        InputError: the datalist is missing or malformed, or lacks ``split``.
    """
    check_label_values(datalist, label_names, splits=checked_splits)
    return load_datalist(datalist, splits=[split])
