"""Deterministic CT / MRI preprocessing presets, and an on-disk cache of their output keyed by the preset.

A preset loads a volume (NIfTI file or DICOM folder), checks it, reorients it to ``axcodes``, resamples
it to ``spacing`` mm, scales intensities to ``[b_min, b_max]`` (a HU window for CT, percentiles for MRI)
and crops it to the foreground. Everything it does is deterministic, so its output can be cached on
disk once (:func:`cached_dataset`) and random augmentation applied on top every epoch.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import monai
import numpy as np
import torch
import yaml
from monai.data import MetaTensor, PersistentDataset
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureTyped,
    MapTransform,
    Orientationd,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Spacingd,
    reset_ops_id,
)
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

import medssl3d
from medssl3d.data.atomic_files import atomic_write_json
from medssl3d.data.datalist import SERIES_UID_KEY
from medssl3d.data.errors import InputError
from medssl3d.data.n4 import N4_ITERATIONS, N4_SHRINK_FACTOR, N4BiasFieldCorrectiond
from medssl3d.data.readers import volume_loader
from medssl3d.data.validation import ValidateVolumed

logger = logging.getLogger(__name__)

#: Soft-tissue HU window of the CT preset (abdomen: fat to contrast-enhanced organs).
CT_HU_WINDOW_MIN = -125.0
CT_HU_WINDOW_MAX = 225.0
CT_SPACING_MM = 1.5
#: After windowing, air and lung sit at 0; anything above is body.
CT_FOREGROUND_THRESHOLD = 0.0
#: MRI intensities have no physical unit: map the 0.5th..99.5th percentiles to [0, 1].
MRI_LOWER_PERCENTILE = 0.5
MRI_UPPER_PERCENTILE = 99.5
MRI_SPACING_MM = 1.0
#: After percentile scaling, background noise stays below this (a few % of the 99.5th percentile).
MRI_FOREGROUND_THRESHOLD = 0.05
#: Output intensity range of both presets.
OUTPUT_MIN = 0.0
OUTPUT_MAX = 1.0
#: Voxels (at the target spacing) kept around the foreground box, so structures at its edge stay whole.
CROP_MARGIN_VOXELS = 8
#: Length of the hexadecimal preset hash naming the cache folder.
CACHE_HASH_CHARS = 16
CACHE_INFO_FILE = "preset.json"

SCALINGS = ("window", "percentile")
#: Field values a :class:`PresetConfig` takes from its modality when they are left as ``None``.
MODALITY_DEFAULTS = {
    "ct": {"scaling": "window", "foreground_threshold": CT_FOREGROUND_THRESHOLD},
    "mri": {"scaling": "percentile", "foreground_threshold": MRI_FOREGROUND_THRESHOLD},
}
_AXCODE_PAIRS = ("LR", "PA", "IS")


def _valid_axcodes(axcodes: str) -> bool:
    """True when ``axcodes`` names one direction of each anatomical axis, e.g. "RAS" or "LPI"."""
    axes = [next((pair for pair in _AXCODE_PAIRS if c in pair), None) for c in axcodes.upper()]
    return len(axes) == 3 and sorted(a or "" for a in axes) == sorted(_AXCODE_PAIRS)


def _above(x: torch.Tensor, threshold: float) -> torch.Tensor:
    # A module-level function (not a lambda) so the transform pickles into DataLoader workers.
    return x > threshold


class LoadSeriesAwared(MapTransform):
    """:func:`~medssl3d.data.readers.volume_loader` that honours a datalist entry's ``"series_uid"``.

    A DICOM folder holding several series appears in a datalist once per series, each entry naming its
    series in ``"series_uid"`` (see :func:`~medssl3d.data.folder_scan.scan_folder`); this loads that series.
    Entries without the field load as ``volume_loader`` does. Output: ``{key: MetaTensor (1, D, H, W)}``.

    Args:
        keys: keys to load (NIfTI/NRRD/MetaImage files and DICOM folders, mixed).
        allow_4d_index: volume to take from 4D inputs; ``None`` refuses them.
        series_key: entry field that names the series.
    """

    def __init__(
        self, keys: Sequence[str], *, allow_4d_index: int | None = None, series_key: str = SERIES_UID_KEY
    ) -> None:
        super().__init__(keys)
        self.allow_4d_index = allow_4d_index
        self.series_key = series_key
        self._loaders: dict[str | None, Callable] = {}

    def _loader(self, series_uid: str | None) -> Callable:
        # One loader per series seen (few: only multi-series folders carry a UID); building a
        # LoadImaged per call would redo its reader set-up.
        if series_uid not in self._loaders:
            self._loaders[series_uid] = volume_loader(
                self.keys,
                ensure_channel_first=True,
                allow_4d_index=self.allow_4d_index,
                series_uid=series_uid,
            )
        return self._loaders[series_uid]

    def __call__(self, data: Mapping) -> dict:
        """Load every key of ``data``, the image from the series ``data[series_key]`` names (if any)."""
        return self._loader(data.get(self.series_key))(data)


@dataclasses.dataclass(frozen=True)
class PresetConfig:
    """Deterministic preprocessing of one modality (every number the preset uses lives here).

    Args:
        modality: ``"ct"`` or ``"mri"``; picks the defaults of ``scaling`` and ``foreground_threshold``.
        spacing: target voxel size in mm along the output array axes (``axcodes`` order).
        axcodes: target orientation, e.g. ``"RAS"`` (array axes run to Right, Anterior, Superior).
        scaling: ``"window"`` maps ``[a_min, a_max]`` to ``[b_min, b_max]`` (CT, in HU); ``"percentile"``
            maps the ``lower_percentile``..``upper_percentile`` intensities of each volume (MRI).
            ``None``: by modality (:data:`MODALITY_DEFAULTS`).
        a_min: intensity mapped to ``b_min`` (window scaling).
        a_max: intensity mapped to ``b_max`` (window scaling).
        b_min: output minimum.
        b_max: output maximum.
        clip: clip the output to ``[b_min, b_max]``.
        lower_percentile: percentile mapped to ``b_min`` (percentile scaling).
        upper_percentile: percentile mapped to ``b_max`` (percentile scaling).
        crop_foreground: crop to the box of voxels above ``foreground_threshold`` (after scaling).
        foreground_threshold: scaled intensity above which a voxel is foreground; ``None``: by modality.
        crop_margin: voxels kept around the foreground box.
        n4_bias_correction: run N4 bias-field correction (SimpleITK) before resampling (MRI).
        n4_shrink_factor: shrink factor of the N4 fit.
        n4_iterations: N4 iterations per fitting level.
        allow_4d_index: take this volume of 4D inputs; ``None`` refuses 4D inputs.

    Raises:
        ValueError: for an unknown modality/scaling, bad axcodes, non-positive spacing or empty ranges.
    """

    modality: str
    spacing: tuple[float, float, float]
    axcodes: str = "RAS"
    scaling: str | None = None
    a_min: float = CT_HU_WINDOW_MIN
    a_max: float = CT_HU_WINDOW_MAX
    b_min: float = OUTPUT_MIN
    b_max: float = OUTPUT_MAX
    clip: bool = True
    lower_percentile: float = MRI_LOWER_PERCENTILE
    upper_percentile: float = MRI_UPPER_PERCENTILE
    crop_foreground: bool = True
    foreground_threshold: float | None = None
    crop_margin: int = CROP_MARGIN_VOXELS
    n4_bias_correction: bool = False
    n4_shrink_factor: int = N4_SHRINK_FACTOR
    n4_iterations: tuple[int, ...] = N4_ITERATIONS
    allow_4d_index: int | None = None

    def __post_init__(self) -> None:
        # Sequences may arrive as lists (YAML, omegaconf): normalise so configs compare and hash equal.
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "n4_iterations", tuple(int(i) for i in self.n4_iterations))
        if self.modality not in MODALITY_DEFAULTS:
            raise ValueError(f"modality must be one of {tuple(MODALITY_DEFAULTS)}, got {self.modality!r}")
        for name, default in MODALITY_DEFAULTS[self.modality].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        if self.scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {SCALINGS}, got {self.scaling!r}")
        if len(self.spacing) != 3 or any(s <= 0 for s in self.spacing):
            raise ValueError(f"spacing must be 3 positive numbers (mm), got {self.spacing!r}")
        if not _valid_axcodes(self.axcodes):
            raise ValueError(f"axcodes must name each of L/R, P/A, I/S once, got {self.axcodes!r}")
        if not self.a_min < self.a_max:
            raise ValueError(f"a_min must be < a_max, got {self.a_min!r}, {self.a_max!r}")
        if not self.b_min < self.b_max:
            raise ValueError(f"b_min must be < b_max, got {self.b_min!r}, {self.b_max!r}")
        if not 0.0 <= self.lower_percentile < self.upper_percentile <= 100.0:
            raise ValueError(
                f"need 0 <= lower_percentile < upper_percentile <= 100, got "
                f"{self.lower_percentile!r}, {self.upper_percentile!r}"
            )
        if self.crop_margin < 0:
            raise ValueError(f"crop_margin must be >= 0, got {self.crop_margin!r}")


CT_PRESET = PresetConfig(modality="ct", spacing=(CT_SPACING_MM,) * 3)
MRI_PRESET = PresetConfig(modality="mri", spacing=(MRI_SPACING_MM,) * 3)


def preset_for(modality: str, spacing_mm: float | Sequence[float] | None = None) -> PresetConfig:
    """The CT or MRI preset, optionally at another spacing (the form bundles use: ``modality``, ``spacing_mm``).

    Args:
        modality: ``"ct"`` or ``"mri"`` (any case).
        spacing_mm: one isotropic spacing or three; ``None`` keeps the preset's.

    Raises:
        ValueError: an unknown modality or a bad spacing.
    """
    presets = {"ct": CT_PRESET, "mri": MRI_PRESET}
    key = str(modality).lower()
    if key not in presets:
        raise ValueError(f"modality must be one of {tuple(presets)}, got {modality!r}")
    if spacing_mm is None:
        return presets[key]
    spacing = (spacing_mm,) * 3 if isinstance(spacing_mm, (int, float)) else tuple(spacing_mm)
    return dataclasses.replace(presets[key], spacing=spacing)


def preset_from_yaml(path: str | os.PathLike, **overrides) -> PresetConfig:
    """Read a :class:`PresetConfig` from YAML (e.g. ``configs/data/ct.yaml``), with keyword overrides.

    The YAML is merged into ``OmegaConf.structured(PresetConfig)``, so values are type-checked and a key
    that is not a field is refused.

    Args:
        path: the YAML file.
        overrides: field values that win over the file, e.g. ``spacing=(2.0, 2.0, 2.0)``.

    Returns:
        The preset.

    Raises:
        InputError: the file is missing or not valid YAML, holds an unknown key or a wrongly typed value,
            lacks a required field (the message names the key), or the result fails the preset's checks.
        ValueError: an override names an unknown key or has the wrong type.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(path, "preset file not found")
    schema = OmegaConf.structured(PresetConfig)
    try:
        loaded = OmegaConf.load(path)
    except (OSError, yaml.YAMLError) as e:
        raise InputError(path, f"not valid YAML: {' '.join(str(e).split())}") from e
    try:
        merged = OmegaConf.merge(schema, loaded)
    except (OmegaConfBaseException, ValueError) as e:
        raise InputError(path, f"bad preset: {_first_line(e)} (fields: {', '.join(_field_names())})") from e
    try:
        merged = OmegaConf.merge(merged, overrides)
    except OmegaConfBaseException as e:
        raise ValueError(
            f"bad preset override: {_first_line(e)} (fields: {', '.join(_field_names())})"
        ) from e
    try:
        return OmegaConf.to_object(merged)
    except (OmegaConfBaseException, ValueError) as e:
        # The preset's own checks (__post_init__) land here too; name the file and any overrides.
        given = f" with overrides {overrides}" if overrides else ""
        raise InputError(path, f"bad preset{given}: {_first_line(e)}") from e


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0]


def _field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(PresetConfig)]


def build_preset(cfg: PresetConfig, keys: Sequence[str] = ("image", "label")) -> Compose:
    """The deterministic preprocessing of ``cfg`` as a MONAI ``Compose`` from file paths to tensors.

    Steps: load (:class:`LoadSeriesAwared`, channel first) -> check
    (:class:`~medssl3d.data.validation.ValidateVolumed`) -> [N4] -> reorient -> resample (bilinear for the
    image, nearest for labels) -> scale intensities -> crop to foreground (image as source) -> tensors.

    Args:
        cfg: the preset.
        keys: datalist keys; the first is the image, the others are labels (resampled with nearest
            neighbour, never intensity-scaled, cropped with the image).

    Returns:
        A ``Compose`` mapping ``{key: path}`` to ``{key: MetaTensor (1, D, H, W) float32}`` whose affine
        has voxel sizes (column norms) ``cfg.spacing`` and orientation ``cfg.axcodes``.

    Raises:
        ValueError: if ``keys`` is empty.
    """
    keys = (keys,) if isinstance(keys, str) else tuple(keys)
    if not keys:
        raise ValueError("keys must name at least the image key")
    image_key = keys[0]
    transforms: list[Callable] = [
        LoadSeriesAwared(keys, allow_4d_index=cfg.allow_4d_index),
        ValidateVolumed(keys, allow_4d_index=cfg.allow_4d_index),
    ]
    if cfg.n4_bias_correction:
        transforms.append(
            N4BiasFieldCorrectiond(
                image_key, shrink_factor=cfg.n4_shrink_factor, iterations=cfg.n4_iterations
            )
        )
    transforms += [
        # Our readers give RAS affines; naming the axis labels keeps axcodes meaning RAS-world codes.
        Orientationd(keys, axcodes=cfg.axcodes, labels=tuple(tuple(pair) for pair in _AXCODE_PAIRS)),
        Spacingd(keys, pixdim=cfg.spacing, mode=("bilinear",) + ("nearest",) * (len(keys) - 1)),
    ]
    if cfg.scaling == "window":
        transforms.append(
            ScaleIntensityRanged(
                image_key, a_min=cfg.a_min, a_max=cfg.a_max, b_min=cfg.b_min, b_max=cfg.b_max, clip=cfg.clip
            )
        )
    else:
        transforms.append(
            ScaleIntensityRangePercentilesd(
                image_key,
                lower=cfg.lower_percentile,
                upper=cfg.upper_percentile,
                b_min=cfg.b_min,
                b_max=cfg.b_max,
                clip=cfg.clip,
            )
        )
    if cfg.crop_foreground:
        transforms.append(
            CropForegroundd(
                keys,
                source_key=image_key,
                select_fn=functools.partial(_above, threshold=cfg.foreground_threshold),
                margin=cfg.crop_margin,
                allow_smaller=True,
                # No coordinate keys: they come back as numpy arrays when computed and as tensors when read
                # from the cache, and a batch mixing both does not collate. The crop is in the item's trace.
                start_coord_key=None,
                end_coord_key=None,
            )
        )
    transforms.append(EnsureTyped(keys, dtype=torch.float32, track_meta=True))
    return Compose(transforms)


def preset_hash(cfg: PresetConfig, keys: Sequence[str]) -> str:
    """A short hash of everything that determines a preset's output.

    It covers every field of ``cfg``, the keys, and the medssl3d and MONAI versions (either may change
    what a transform computes), so changing any of them never reuses a stale cache.
    """
    blob = json.dumps(_cache_info(cfg, keys), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:CACHE_HASH_CHARS]


#: Bumped when what a cached item holds changes (2: no foreground crop coordinates).
CACHE_FORMAT = 2


def _cache_info(cfg: PresetConfig, keys: Sequence[str]) -> dict:
    return {
        "preset": dataclasses.asdict(cfg),
        "keys": list(keys),
        "medssl3d": medssl3d.__version__,
        "monai": monai.__version__,
        "format": CACHE_FORMAT,
    }


def _weights_only_safe(obj):
    """(Nested) meta data with numpy arrays as tensors, numpy scalars as numbers, string enums as str.

    Readers put numpy arrays in the meta data and MONAI keys traced operations by its ``TraceKeys``
    enum; ``torch.load(weights_only=True)`` refuses both, so a cache holding them could never be read
    back. String enums hash and compare like their values, so lookups by enum still work.
    """
    if isinstance(obj, np.ndarray):
        return torch.as_tensor(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, str) and isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, Mapping):
        return {_weights_only_safe(k): _weights_only_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_weights_only_safe(v) for v in obj)
    return obj


class _PresetPersistentDataset(PersistentDataset):
    """PersistentDataset that caches exactly the first ``n_cached`` transforms (the preset).

    MONAI's PersistentDataset caches up to the first random transform, which would also cache
    deterministic user transforms in ``extra_transforms`` that the cache key does not cover. Meta data
    is stored with tensors instead of numpy arrays so the cache loads with ``weights_only=True``.
    """

    def __init__(self, data: Sequence, transform: Compose, cache_dir: Path, *, n_cached: int) -> None:
        super().__init__(data, transform=transform, cache_dir=cache_dir, track_meta=True)
        self.n_cached = n_cached

    def _pre_transform(self, item_transformed):
        item = self.transform(item_transformed, end=self.n_cached, threading=True)
        reset_ops_id(item)
        for value in item.values():
            if isinstance(value, MetaTensor):
                value.meta = _weights_only_safe(value.meta)
                value.applied_operations = _weights_only_safe(value.applied_operations)
        return item

    def _post_transform(self, item_transformed):
        return self.transform(item_transformed, start=self.n_cached)


def cached_dataset(
    data: Sequence[dict],
    cfg: PresetConfig,
    cache_root: str | os.PathLike,
    *,
    keys: Sequence[str] = ("image", "label"),
    extra_transforms: Sequence[Callable] | None = None,
) -> PersistentDataset:
    """A dataset whose preset output is computed once and then read from ``cache_root/<preset hash>``.

    The first access of a case runs :func:`build_preset` and stores the result (tensors with their
    affine and metadata); later accesses, in this or any later run with the same preset, keys and
    versions, read it back without decoding the source file. ``extra_transforms`` (augmentation) run
    after the cache on every access and are never cached. Within a preset folder, MONAI names each cached
    case by a hash of its datalist entry (paths, not file contents): after overwriting a source file in
    place, delete the preset folder.

    Args:
        data: datalist entries with absolute paths (e.g. from :func:`~medssl3d.data.datalist.load_datalist`).
        cfg: the preset.
        cache_root: folder holding one cache folder per preset; the folder gets a ``preset.json``
            describing what it holds.
        keys: datalist keys (first = image), as in :func:`build_preset`.
        extra_transforms: transforms applied after the cached preset.

    Returns:
        A MONAI ``PersistentDataset``; its ``cache_dir`` is ``cache_root/<preset_hash(cfg, keys)>``.
    """
    keys = (keys,) if isinstance(keys, str) else tuple(keys)
    preset = build_preset(cfg, keys)
    cache_dir = Path(cache_root).expanduser() / preset_hash(cfg, keys)
    cache_dir.mkdir(parents=True, exist_ok=True)
    if not (cache_dir / CACHE_INFO_FILE).exists():
        # several ranks may create the same cache folder at once: never let one read a half-written file
        atomic_write_json(cache_dir / CACHE_INFO_FILE, _cache_info(cfg, keys), durable=False, sort_keys=True)
    logger.info("preprocessing cache for %s preset: %s", cfg.modality, cache_dir)
    transform = Compose([*preset.transforms, *(extra_transforms or ())])
    return _PresetPersistentDataset(data, transform, cache_dir, n_cached=len(preset.transforms))
