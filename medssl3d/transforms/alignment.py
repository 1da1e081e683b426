"""AFiRe's alignment: every volume on one fixed grid, so a token position is the same anatomy in every scan.

The data preset (``medssl3d.data.presets``) already reorients and resamples to isotropic spacing;
:func:`alignment_transforms` adds the crop to the foreground (body / brain) box and the resize to
a fixed size (96^3 by default), optionally after an affine registration to a template
(:class:`RegisterToTemplated`, using the ``registration`` provider: SimpleITK at a coarse spacing).
Every step is a MONAI ``InvertibleTransform``, so ``Compose.inverse`` maps a map computed on the
aligned grid (an anomaly heatmap) back onto the input's grid.

Without a template, alignment is only as good as the agreement of the foreground boxes: CT of the
chest, the abdomen or the whole body differ most along the inferior->superior axis, and after the
resize token ``j`` would then hold different anatomy in different scans. :class:`ForegroundExtentCheckd`
logs a warning naming every case whose box extent departs from the median of the cases before it.

Alignment is only meaningful without random spatial augmentation:
:func:`check_no_spatial_augmentation` refuses a pipeline that holds one.

Shapes are written (C, D, H, W); after the preset's ``Orientationd("RAS")`` the spatial axes D, H, W
run left->right, posterior->anterior and inferior->superior (an (x, y, z) index order).
See ``docs/methods.md`` (section "AFiRe-3D").
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
from collections.abc import Hashable, Iterator, Mapping, Sequence
from pathlib import Path

import monai
import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import Compose, CropForegroundd, InvertibleTransform, LoadImage, MapTransform, Resized
from monai.utils import ensure_tuple_rep

from medssl3d.data.errors import InputError
from medssl3d.transforms.correspondence import Volume
from medssl3d.transforms.disk_cache import DiskCachedd, content_fingerprint
from medssl3d.transforms.registration import DEFAULT_AFFINE_ITERATIONS, DEFAULT_COARSE_SPACING, RegistrationProvider

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_SIZE",
    "EXTENT_TOLERANCE",
    "ForegroundExtentCheckd",
    "RegisterToTemplated",
    "alignment_transforms",
    "check_no_spatial_augmentation",
    "find_spatial_augmentations",
]

DEFAULT_SIZE = (96, 96, 96)
PRESET_LARGE_SIZE = (128, 128, 128)
FOREGROUND_THRESHOLD = 0.0
"""Voxels above this (preset output in [0, 1]) are foreground (body for CT, head for MRI)."""
CROP_MARGIN = 0
IMAGE_MODE = "trilinear"
LABEL_MODE = "nearest"
COARSE_SPACING_MM = DEFAULT_COARSE_SPACING
"""Registration is estimated on both volumes resampled to this isotropic spacing (the provider's default)."""
REGISTRATION_ITERATIONS = DEFAULT_AFFINE_ITERATIONS
EXTENT_TOLERANCE = 0.25
"""Relative departure, on any axis, of a case's foreground-box extent from the median extent above which
alignment without a template warns (0.25: a 400 mm box against a 320 mm median)."""
AXIS_NAMES = ("left-right", "posterior-anterior", "inferior-superior")
SPATIAL_AUGMENTATION = re.compile(r"^Rand\w*(Crop|Flip|Affine|Rotat|Zoom|Elastic|Deform|GridDistortion|GridPatch)")
"""Class names of random transforms that move anatomy (MONAI's and ours, e.g. ``RandRotate90Classd``)."""


def _above(x: torch.Tensor, threshold: float) -> torch.Tensor:
    # Module-level (not a lambda) so the transform pickles into DataLoader workers.
    return x > threshold


def _walk(transform) -> Iterator:
    yield transform
    for child in getattr(transform, "transforms", ()) or ():
        yield from _walk(child)


def find_spatial_augmentations(transform) -> list[str]:
    """Class names of random spatial augmentations anywhere in ``transform`` (nested Compose / OneOf included)."""
    return [type(t).__name__ for t in _walk(transform) if SPATIAL_AUGMENTATION.match(type(t).__name__)]


def check_no_spatial_augmentation(transform, where: str = "AFiRe pipeline"):
    """Refuse a pipeline with random spatial augmentation (AFiRe needs every volume on the same grid).

    Args:
        transform: a transform or ``Compose`` (searched recursively).
        where: what to call the pipeline in the error.

    Returns:
        ``transform`` unchanged, so the check can wrap a pipeline in a bundle config.

    Raises:
        ValueError: naming every spatial augmentation found.
    """
    found = find_spatial_augmentations(transform)
    if found:
        raise ValueError(
            f"{where} must not contain random spatial augmentations (token positions must stay aligned); "
            f"found {', '.join(found)}"
        )
    return transform


def _index_map_grid(matrix: np.ndarray, in_shape: Sequence[int], out_shape: Sequence[int]) -> torch.Tensor:
    """``grid_sample`` grid (1, *out_shape, 3) reading input index ``matrix @ [out index, 1]``."""
    axes = [torch.arange(n, dtype=torch.float64) for n in out_shape]
    idx = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
    m = torch.as_tensor(matrix, dtype=torch.float64)
    src = idx @ m[:3, :3].T + m[:3, 3]
    size = torch.tensor([max(int(n) - 1, 1) for n in in_shape], dtype=torch.float64)
    # align_corners=True: -1 and 1 are the first and last voxel centres; grid_sample wants (x, y, z) order.
    return (2.0 * src / size - 1.0).flip(-1)[None].float()


def _resample(img: torch.Tensor, matrix: np.ndarray, out_shape: Sequence[int], nearest: bool) -> torch.Tensor:
    """``img`` (C, D, H, W) read at input index ``matrix @ [out index, 1]`` on an ``out_shape`` grid (zeros outside)."""
    grid = _index_map_grid(matrix, img.shape[1:], out_shape).to(img.device)
    out = F.grid_sample(
        img[None].float(), grid, mode="nearest" if nearest else "bilinear", padding_mode="zeros", align_corners=True
    )
    return out[0]


def _scale(spacing: Sequence[float]) -> np.ndarray:
    return np.diag([*(float(s) for s in spacing), 1.0])


class RegisterToTemplated(MapTransform, InvertibleTransform):
    """Affine registration to a template (the ``registration`` provider), resampled onto the template's grid.

    The case transform comes from :class:`~medssl3d.transforms.registration.RegistrationProvider`
    (SimpleITK, Mattes MI, estimated at ``coarse_spacing`` mm, cached in memory and in ``cache_dir``),
    so each case is registered once however often it is drawn. Every key is then resampled onto the
    template grid (trilinear for the image, nearest for the others); the output affine places each
    voxel where the case point it was read from lies, and :meth:`inverse` resamples back.

    Args:
        keys: keys of MetaTensors (1, D, H, W) from the data preset; the first is the image.
        template: the template volume, in the preset's orientation: a file path (read by MONAI) or a
            (1, D, H, W) MetaTensor (e.g. a preprocessed case).
        coarse_spacing: isotropic spacing (mm) of the estimation.
        iterations: affine optimizer iterations.
        cache_dir: on-disk cache of the case transforms (None: memory only).
        allow_missing_keys: skip absent keys.

    Raises:
        ValueError: a non-positive spacing or iteration count.
    """

    def __init__(
        self,
        keys: KeysCollection,
        template: str | os.PathLike | MetaTensor,
        coarse_spacing: float = COARSE_SPACING_MM,
        iterations: int = REGISTRATION_ITERATIONS,
        cache_dir: str | os.PathLike | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if coarse_spacing <= 0 or iterations < 1:
            raise ValueError(f"need coarse_spacing > 0 and iterations >= 1; got {coarse_spacing}, {iterations}")
        self.template = template
        self.coarse_spacing = float(coarse_spacing)
        self.iterations = int(iterations)
        self.cache_dir = cache_dir
        self._provider: RegistrationProvider | None = None
        self._template_grid: tuple[tuple[int, ...], tuple[float, ...]] | None = None

    def _load_template(self) -> Volume:
        image = self.template
        if isinstance(image, (str, os.PathLike)):
            path = Path(image)
            if not path.is_file():
                raise InputError(path, "registration template not found")
            image = LoadImage(image_only=True, ensure_channel_first=True)(str(path))
        return Volume.from_image(image)

    @property
    def provider(self) -> RegistrationProvider:
        """The registration provider (built on first use, so the transform pickles cheaply)."""
        if self._provider is None:
            volume = self._load_template()
            self._template_grid = (volume.shape, volume.spacing)
            self._provider = RegistrationProvider(
                volume, coarse_spacing=self.coarse_spacing, cache_dir=self.cache_dir, affine_iterations=self.iterations
            )
        return self._provider

    def __call__(self, data: Mapping[Hashable, MetaTensor]) -> dict[Hashable, MetaTensor]:
        """Register the first key to the template; resample every key onto the template grid."""
        d = dict(data)
        first = self.first_key(d)
        if first == ():
            return d
        case = d[first]
        case_to_template = self.provider.case_transform(Volume.from_image(case)).matrix
        template_shape, template_spacing = self._template_grid
        case_spacing = Volume.from_image(case).spacing
        # template index -> template mm -> case mm -> case index
        out_to_in = np.linalg.inv(_scale(case_spacing)) @ np.linalg.inv(case_to_template) @ _scale(template_spacing)
        for i, key in enumerate(self.key_iterator(d)):
            src = d[key]
            out = MetaTensor(
                _resample(src.as_tensor(), out_to_in, template_shape, nearest=i > 0),
                affine=torch.as_tensor(src.affine.numpy() @ out_to_in, dtype=torch.float64),
                meta=dict(src.meta),
                applied_operations=list(src.applied_operations),
            )
            self.push_transform(
                out,
                orig_size=tuple(src.shape[1:]),
                extra_info={
                    "in_to_out": np.linalg.inv(out_to_in).tolist(),
                    "orig_affine": src.affine.tolist(),
                    "nearest": i > 0,
                },
            )
            d[key] = out
        return d

    def inverse(self, data: Mapping[Hashable, MetaTensor]) -> dict[Hashable, MetaTensor]:
        """Resample every key from the template grid back onto its original grid."""
        d = dict(data)
        for key in self.key_iterator(d):
            op = self.pop_transform(d[key])
            info = op["extra_info"]
            src = d[key]
            d[key] = MetaTensor(
                _resample(src.as_tensor(), np.asarray(info["in_to_out"]), op["orig_size"], info["nearest"]),
                affine=torch.as_tensor(info["orig_affine"], dtype=torch.float64),
                meta=dict(src.meta),
                applied_operations=list(src.applied_operations),
            )
        return d


def _extent_text(extent: np.ndarray, unit: str) -> str:
    return " x ".join(f"{e:.0f}" for e in extent) + f" {unit}"


class ForegroundExtentCheckd(MapTransform):
    """Warn when a case's foreground box differs in extent from the cases seen before it; data pass unchanged.

    Placed after the foreground crop (and the resize, which keeps the field of view), the volume's shape
    times its voxel spacing is the box extent (mm for a ``MetaTensor``, voxels otherwise). Each case is
    recorded once under its source file name (``filename_or_obj``); a new case whose extent on any axis
    departs from the median extent of the cases recorded before it by more than ``tolerance`` (relative)
    is logged as a warning that names it, its extent and the median. Each ``DataLoader`` worker keeps its
    own record.

    Args:
        keys: the image key (the first key is read).
        tolerance: relative departure that warns (> 0).
        allow_missing_keys: skip an absent key.

    Raises:
        ValueError: ``tolerance <= 0``.
    """

    def __init__(self, keys: KeysCollection, tolerance: float = EXTENT_TOLERANCE, allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        if tolerance <= 0:
            raise ValueError(f"extent tolerance must be > 0, got {tolerance}")
        self.tolerance = float(tolerance)
        self.extents: dict[str, np.ndarray] = {}

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        """Record the first key's box extent and warn when it departs from the median of earlier cases."""
        d = dict(data)
        key = self.first_key(d)
        if key == ():
            return d
        img = d[key]
        meta = getattr(img, "meta", {})
        name = str(meta.get("filename_or_obj") or f"unnamed case {len(self.extents)}")
        if name in self.extents:
            return d
        spacing = img.pixdim.numpy() if isinstance(img, MetaTensor) else np.ones(3)
        extent = np.asarray(img.shape[1:], dtype=np.float64) * spacing
        if self.extents:
            median = np.median(np.stack(list(self.extents.values())), axis=0)
            departure = np.abs(extent - median) / median
            if bool((departure > self.tolerance).any()):
                unit = "mm" if isinstance(img, MetaTensor) else "voxels"
                axes = ", ".join(AXIS_NAMES[i] for i in np.flatnonzero(departure > self.tolerance))
                logger.warning(
                    "alignment without a template: the foreground box of %s is %s, more than %.0f%% from the "
                    "median %s of the %d case(s) before it (along %s); token positions then hold different "
                    "anatomy across scans: give a registration template or data of one coverage",
                    name,
                    _extent_text(extent, unit),
                    100 * self.tolerance,
                    _extent_text(median, unit),
                    len(self.extents),
                    axes,
                )
        self.extents[name] = extent
        return d


def alignment_transforms(
    keys: Sequence[str] = ("image",),
    size: Sequence[int] | int = DEFAULT_SIZE,
    *,
    foreground_threshold: float = FOREGROUND_THRESHOLD,
    margin: int = CROP_MARGIN,
    template: str | os.PathLike | None = None,
    coarse_spacing: float = COARSE_SPACING_MM,
    registration_iterations: int = REGISTRATION_ITERATIONS,
    registration_cache_dir: str | os.PathLike | None = None,
    extent_tolerance: float | None = EXTENT_TOLERANCE,
    cache_dir: str | os.PathLike | None = None,
) -> Compose:
    """Fixed-grid alignment after a data preset: [register to template] -> foreground crop -> resize.

    Args:
        keys: keys of preset outputs (MetaTensor (1, D, H, W), [0, 1] intensities); the first is the image,
            the others (labels) are resized with nearest neighbour.
        size: the fixed output size (D, H, W) (96^3 default, 128^3 for the large preset).
        foreground_threshold: image intensity above which a voxel is foreground.
        margin: voxels kept around the foreground box.
        template: a template volume to register to first (None: no registration).
        coarse_spacing: spacing (mm) at which the registration is estimated.
        registration_iterations: optimizer iterations of the registration.
        registration_cache_dir: on-disk cache of the case transforms (None: memory only).
        extent_tolerance: without a template, warn when a case's foreground box departs from the median
            box by more than this (relative, any axis; see :class:`ForegroundExtentCheckd`); None: never.
        cache_dir: keep each case's aligned volumes here and read them back on later calls
            (:class:`~medssl3d.transforms.disk_cache.DiskCachedd`, bit for bit); None: align on every call.

    Returns:
        A ``Compose`` giving ``{key: MetaTensor (1, *size)}``, invertible unless ``cache_dir`` is set.

    Raises:
        ValueError: empty ``keys`` or a non-positive size.
    """
    keys = (keys,) if isinstance(keys, str) else tuple(keys)
    if not keys:
        raise ValueError("keys must name at least the image key")
    size = tuple(int(s) for s in ensure_tuple_rep(size, 3))
    if any(s < 1 for s in size):
        raise ValueError(f"size must be positive, got {size}")
    steps = []
    if template is not None:
        steps.append(
            RegisterToTemplated(
                keys,
                template,
                coarse_spacing=coarse_spacing,
                iterations=registration_iterations,
                cache_dir=registration_cache_dir,
            )
        )
    steps += [
        CropForegroundd(
            keys,
            source_key=keys[0],
            select_fn=functools.partial(_above, threshold=foreground_threshold),
            margin=margin,
            allow_smaller=True,
            # The inverse reads the crop from the applied operations; no box keys in the sample.
            start_coord_key=None,
            end_coord_key=None,
        ),
        Resized(
            keys,
            spatial_size=size,
            mode=(IMAGE_MODE,) + (LABEL_MODE,) * (len(keys) - 1),
            anti_aliasing=(True,) + (False,) * (len(keys) - 1),
        ),
    ]
    if cache_dir is not None:
        if template is None or isinstance(template, (str, os.PathLike)):
            described = str(template)
        else:
            described = hashlib.sha256(content_fingerprint(template)).hexdigest()
        settings = (
            f"alignment keys={keys} size={size} threshold={foreground_threshold} margin={margin} "
            f"template={described} coarse_spacing={coarse_spacing} iterations={registration_iterations} "
            f"monai={monai.__version__}"
        )
        steps = [DiskCachedd(keys, Compose(steps), cache_dir, settings)]
    # After the cache, so that every case is checked in every run.
    if template is None and extent_tolerance is not None:
        steps.append(ForegroundExtentCheckd(keys[0], tolerance=extent_tolerance))
    return Compose(steps)
