"""The dataset of a pretraining bundle: every image of a datalist, preset cached, views per access."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from monai.data import PersistentDataset

from medssl3d.data.datalist import load_datalist
from medssl3d.data.errors import InputError
from medssl3d.data.presets import PresetConfig, cached_dataset

logger = logging.getLogger(__name__)

# Pretraining uses every image, labelled or not; these are the splits a datalist may hold them in.
PRETRAIN_SPLITS = ("training", "validation", "unlabeled")
# Held-out cases (nnU-Net's imagesTs): never pretrained on.
TEST_SPLIT = "test"
# The datalist fields a pretraining sample carries: the image, and its subject and volume id (DiRA's queue) where
# every entry has one. Other fields (case, slab, ...) differ between entries: a batch mixing them cannot be collated.
SAMPLE_KEYS = ("image",)
SHARED_KEYS = ("subject", "volume_id")


def pretraining_dataset(
    datalist: str | os.PathLike,
    preset: PresetConfig,
    cache_dir: str | os.PathLike,
    view_transforms: Sequence[Callable] | Callable,
    *,
    splits: Sequence[str] = PRETRAIN_SPLITS,
    exclude_subjects: Sequence[str] = (),
    skip_bad: bool = True,
) -> PersistentDataset:
    """Images of ``datalist`` with ``preset`` applied once (cached in ``cache_dir``) and views drawn per access.

    Args:
        datalist: Decathlon-style JSON; the images of every split in ``splits`` that it holds are used.
        preset: the deterministic preprocessing (orientation, spacing, intensity, foreground crop).
        cache_dir: folder of the preprocessing cache (one sub-folder per preset).
        view_transforms: the method's random view generation, applied after the cache on every access.
        splits: split names to take images from; absent ones are ignored. Never ``"test"``.
        exclude_subjects: entries whose ``subject`` is listed are left out (held-out test subjects).
        skip_bad: log and leave out unreadable cases (a long run keeps going); ``False`` raises on any.

    Returns:
        A ``PersistentDataset`` of view dicts.

    Raises:
        InputError: the datalist holds none of ``splits``, or no image is left.
        ValueError: ``splits`` names the held-out ``"test"`` split.
    """
    path = Path(datalist)
    if TEST_SPLIT in splits:
        raise ValueError(f"{path}: the {TEST_SPLIT!r} split holds held-out cases, which pretraining never reads")
    try:
        present = [s for s in splits if json.loads(path.read_text()).get(s)]
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(path, f"cannot read the datalist ({err})") from err
    if not present:
        raise InputError(path, f"holds no images in any of the splits {tuple(splits)}")
    entries = load_datalist(path, splits=present, keys=("image",), skip_bad=skip_bad)
    held_out = set(exclude_subjects)
    entries = [e for e in entries if e.get("subject") not in held_out]
    if not entries:
        raise InputError(path, f"no image left after excluding subjects {sorted(held_out)}")
    keys = [*SAMPLE_KEYS, *(k for k in SHARED_KEYS if all(k in e for e in entries))]
    entries = [{k: e[k] for k in keys} for e in entries]
    logger.info("pretraining on %d images from %s (splits %s)", len(entries), path, present)
    extra = list(view_transforms) if isinstance(view_transforms, Sequence) else [view_transforms]
    return cached_dataset(entries, preset, cache_dir, keys=("image",), extra_transforms=extra)
