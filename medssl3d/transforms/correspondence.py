"""Correspondence providers: map a point of a query volume to the matching point of a key volume.

Alice (``docs/methods.md``, section "Alice", view step 3) crops two *different* volumes around
anatomically corresponding points. Every provider implements one interface,
``provider(vol_q, vol_k, p) -> (p', score)``: ``p`` is a voxel position in the query volume (array
index order of the last three axes: after ``Orientationd("RAS")`` left→right, posterior→anterior,
inferior→superior, an (x, y, z) order), ``p'`` the corresponding position in the key volume (floats;
it may fall outside the key volume, crops are padded), and ``score`` a confidence in ``[0, 1]`` that
the retry loop of :class:`~medssl3d.transforms.paired_crops.RandCorrespondingCropsd` compares with
its threshold.

This module holds the interface, the volume record every provider receives, the shared local
normalised cross-correlation score, and the two providers that need no fitting:

- :class:`SameVolumeProvider`: ``K = Q`` and ``p' = p + jitter``; the score is the overlap of the two crops.
- :class:`BodyBoxProvider`: the fractional position of ``p`` in Q's foreground box, mapped into K's box.

The registration and feature providers live in :mod:`medssl3d.transforms.registration` and
:mod:`medssl3d.transforms.feature_match`.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.transforms import Randomizable

__all__ = [
    "DEFAULT_CROP",
    "DEFAULT_FOREGROUND_THRESHOLD",
    "BodyBoxProvider",
    "CorrespondenceProvider",
    "SameVolumeProvider",
    "Volume",
    "extract_patch",
    "foreground_box",
    "local_ncc",
]

DEFAULT_CROP = (96, 96, 96)
"""Crop side in voxels (``docs/methods.md``, section "Alice", view step 4; the Swin default)."""
DEFAULT_FOREGROUND_THRESHOLD = 0.0
"""Scaled intensity above which a voxel is body: the CT preset maps HU -125 (the window's low end) to 0."""
DEFAULT_MAX_SHIFT = 0.25
"""same_volume: largest jitter along each axis as a fraction of the crop side (overlap >= 0.75^3)."""
DEFAULT_NCC_STRIDE = 4
"""Local NCC is computed on every 4th voxel of the crop-sized patches (64x fewer voxels, same extent)."""
NCC_EPS = 1e-6
"""Patches with a smaller intensity standard deviation are flat: their NCC is 0."""
NCC_MIN_FRACTION = 0.1
"""Local NCC needs this fraction of the sampled voxel pairs to count (inside both volumes, one of them body), else 0."""


@dataclass(eq=False)
class Volume:
    """One preprocessed volume as providers see it.

    Attributes:
        array: intensities ``(D, H, W)`` float32 (a preset's output, e.g. [0, 1]); after the presets'
            ``Orientationd("RAS")`` the axes run left→right, posterior→anterior, inferior→superior.
        spacing: voxel size in mm along the three array axes.
        case_id: a stable name of the case (file path) for on-disk caches; None when unknown.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    case_id: str | None = None

    @classmethod
    def from_image(cls, image, spacing: Sequence[float] | None = None) -> Volume:
        """Build from a channel-first ``(1, D, H, W)`` tensor / MetaTensor / array or a ``(D, H, W)`` array.

        The spacing and case id come from a MetaTensor's affine and ``filename_or_obj`` when present.

        Raises:
            ValueError: the image is not 3D (after dropping one channel) or has several channels.
        """
        array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        if array.ndim == 4:
            if array.shape[0] != 1:
                raise ValueError(f"expected one channel, got image shape {array.shape}")
            array = array[0]
        if array.ndim != 3:
            raise ValueError(f"expected a (1, D, H, W) or (D, H, W) volume, got shape {array.shape}")
        meta = getattr(image, "meta", None) or {}
        affine = getattr(image, "affine", None)
        if spacing is None:
            if affine is not None:
                lin = np.asarray(affine, dtype=np.float64)[:3, :3]
                spacing = tuple(float(s) for s in np.linalg.norm(lin, axis=0))
            else:
                spacing = (1.0, 1.0, 1.0)
        case_id = meta.get("filename_or_obj")
        return cls(
            array=np.ascontiguousarray(array, dtype=np.float32),
            spacing=tuple(float(s) for s in spacing),
            case_id=str(case_id) if case_id else None,
        )

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape ``(D, H, W)``."""
        return tuple(self.array.shape)


class CorrespondenceProvider(abc.ABC):
    """Interface of every provider: ``(vol_q, vol_k, p) -> (p', score)``.

    Attributes:
        name: registry name ("same_volume", "body_box", "registration", "feature").
        needs_key_volume: False when the key volume is the query itself (same_volume).
    """

    name: str = ""
    needs_key_volume: bool = True

    @abc.abstractmethod
    def __call__(self, vol_q: Volume, vol_k: Volume, p: np.ndarray) -> tuple[np.ndarray, float]:
        """Map ``p`` (3,) voxel position in ``vol_q`` to ``(p' (3,) float64 in vol_k, score in [0, 1])``."""


def extract_patch(
    array: np.ndarray | torch.Tensor, center: Sequence[float], size: Sequence[int], stride: int = 1, fill: float = 0.0
):
    """The ``size`` box centred on ``center`` (last three axes), padded with ``fill`` where it leaves the array.

    The box starts at ``round(center) - size // 2``; every ``stride``-th voxel of it is returned.

    Args:
        array: ``(..., D, H, W)`` numpy array or tensor.
        center: voxel position (3,) (rounded to the nearest voxel).
        size: box side in voxels (3,).
        stride: keep every ``stride``-th voxel along each axis.
        fill: value outside the array.

    Returns:
        ``(..., ceil(size / stride))`` of the same type as ``array``, and the box start (3,) int.
    """
    spatial = array.shape[-3:]
    start = np.round(np.asarray(center, dtype=np.float64)).astype(np.int64) - np.asarray(size) // 2
    stop = start + np.asarray(size)
    lo = np.clip(start, 0, spatial)
    hi = np.clip(stop, 0, spatial)
    out_shape = tuple(array.shape[:-3]) + tuple(-(-int(s) // stride) for s in size)
    if isinstance(array, torch.Tensor):
        out = torch.full(out_shape, fill, dtype=array.dtype, device=array.device)
    else:
        out = np.full(out_shape, fill, dtype=array.dtype)
    if np.any(hi <= lo):
        return out, start
    # first voxel of the stride grid inside the array, per axis
    first = lo + (-(lo - start) % stride)
    if np.any(first >= hi):
        return out, start
    src = tuple(slice(int(f), int(h), stride) for f, h in zip(first, hi, strict=True))
    dst = tuple(
        slice(int((f - s) // stride), int((f - s) // stride) + len(range(int(f), int(h), stride)))
        for f, h, s in zip(first, hi, start, strict=True)
    )
    out[(..., *dst)] = array[(..., *src)]
    return out, start


def local_ncc(
    vol_q: Volume,
    p: Sequence[float],
    vol_k: Volume,
    p_k: Sequence[float],
    size: Sequence[int] = DEFAULT_CROP,
    stride: int = DEFAULT_NCC_STRIDE,
    foreground_threshold: float = DEFAULT_FOREGROUND_THRESHOLD,
) -> float:
    """Normalised cross-correlation of the two crops around ``p`` and ``p_k`` over the body, clipped to ``[0, 1]``.

    Both patches are ``size`` voxels, sampled every ``stride`` voxels. A pair of voxels counts when both
    lie inside their volumes (not in the crop's padding) and at least one of them is above
    ``foreground_threshold``: air against air and padding, which correlate whenever the body outlines
    line up, are left out, so the score measures the content. Fewer than ``NCC_MIN_FRACTION`` of the
    sampled pairs counting, or a flat patch, scores 0.
    """
    a, _ = extract_patch(vol_q.array, p, size, stride, fill=np.nan)
    b, _ = extract_patch(vol_k.array, p_k, size, stride, fill=np.nan)
    # comparisons with NaN (padding) are False
    counted = ~np.isnan(a) & ~np.isnan(b) & ((a > foreground_threshold) | (b > foreground_threshold))
    if counted.sum() < max(NCC_MIN_FRACTION * counted.size, 2):
        return 0.0
    a = a[counted].astype(np.float64)
    b = b[counted].astype(np.float64)
    a, b = a - a.mean(), b - b.mean()
    den = np.sqrt((a * a).mean() * (b * b).mean())
    if den < NCC_EPS**2:
        return 0.0
    return float(np.clip((a * b).mean() / den, 0.0, 1.0))


def foreground_box(array: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Edges of the foreground bounding box in continuous voxel coordinates.

    Voxel centres sit at integer positions, so a box of voxels ``lo..hi`` spans ``[lo - 0.5, hi + 0.5]``.

    Returns:
        ``(lower, upper)`` edges (3,) float64; the whole array when nothing exceeds ``threshold``.
    """
    fg = array > threshold
    lower, upper = np.full(3, -0.5), np.asarray(array.shape, dtype=np.float64) - 0.5
    if not fg.any():
        return lower, upper
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(fg.any(axis=other))
        lower[axis], upper[axis] = hits[0] - 0.5, hits[-1] + 0.5
    return lower, upper


class SameVolumeProvider(CorrespondenceProvider, Randomizable):
    """``K = Q``; ``p' = p + jitter`` with the jitter uniform in ``±max_shift * crop_size`` per axis.

    The score is the fraction of a crop shared by the two crops, ``prod(1 - |jitter| / crop_size)``,
    so the threshold bounds their overlap from below. ``p'`` is kept inside the volume.

    Args:
        crop_size: crop side in voxels (3,).
        max_shift: largest jitter as a fraction of ``crop_size``, in [0, 1).

    Raises:
        ValueError: ``max_shift`` outside [0, 1) or a non-positive crop size.
    """

    name = "same_volume"
    needs_key_volume = False

    def __init__(self, crop_size: Sequence[int] = DEFAULT_CROP, max_shift: float = DEFAULT_MAX_SHIFT) -> None:
        if not 0.0 <= max_shift < 1.0:
            raise ValueError(f"max_shift must be in [0, 1), got {max_shift}")
        self.crop_size = np.asarray([int(s) for s in crop_size], dtype=np.float64)
        if self.crop_size.shape != (3,) or np.any(self.crop_size < 1):
            raise ValueError(f"crop_size must be 3 positive sizes, got {crop_size}")
        self.max_shift = max_shift

    def __call__(self, vol_q: Volume, vol_k: Volume, p: np.ndarray) -> tuple[np.ndarray, float]:
        """Jitter ``p`` inside ``vol_k`` (the query itself) and score the crops' overlap."""
        bound = self.max_shift * self.crop_size
        jitter = np.round(self.R.uniform(-bound, bound))
        p_k = np.clip(np.asarray(p, dtype=np.float64) + jitter, 0, np.asarray(vol_k.shape) - 1)
        overlap = np.clip(1.0 - np.abs(p_k - p) / self.crop_size, 0.0, 1.0)
        return p_k, float(np.prod(overlap))


class BodyBoxProvider(CorrespondenceProvider):
    """The fractional position of ``p`` in Q's foreground box, mapped into K's foreground box.

    Exact when K is Q scaled and shifted along the axes. The score is :func:`local_ncc` of the two crops
    (over the body).
    The boxes of the last pair of volumes are remembered (the retry loop calls with one pair many times).

    Args:
        foreground_threshold: intensity above which a voxel is body (the box, and the voxels the NCC counts).
        crop_size: crop side in voxels for the NCC score.
        ncc_stride: sampling stride of the NCC score.
    """

    name = "body_box"

    def __init__(
        self,
        foreground_threshold: float = DEFAULT_FOREGROUND_THRESHOLD,
        crop_size: Sequence[int] = DEFAULT_CROP,
        ncc_stride: int = DEFAULT_NCC_STRIDE,
    ) -> None:
        self.foreground_threshold = foreground_threshold
        self.crop_size = tuple(int(s) for s in crop_size)
        self.ncc_stride = ncc_stride
        self._memo: tuple | None = None

    def _boxes(self, vol_q: Volume, vol_k: Volume) -> tuple:
        # Holding the volumes keeps their ids from being reused while they are remembered.
        if self._memo is None or self._memo[0] is not vol_q or self._memo[1] is not vol_k:
            box_q = foreground_box(vol_q.array, self.foreground_threshold)
            box_k = foreground_box(vol_k.array, self.foreground_threshold)
            self._memo = (vol_q, vol_k, box_q, box_k)
        return self._memo[2], self._memo[3]

    def map_point(self, vol_q: Volume, vol_k: Volume, p: np.ndarray) -> np.ndarray:
        """``p'`` alone (no score): the box-to-box mapping."""
        (lo_q, hi_q), (lo_k, hi_k) = self._boxes(vol_q, vol_k)
        frac = (np.asarray(p, dtype=np.float64) - lo_q) / (hi_q - lo_q)
        return lo_k + frac * (hi_k - lo_k)

    def __getstate__(self) -> dict:
        # DataLoader workers get a copy: never ship the remembered volumes with it.
        return {**self.__dict__, "_memo": None}

    def __call__(self, vol_q: Volume, vol_k: Volume, p: np.ndarray) -> tuple[np.ndarray, float]:
        """Map ``p`` box to box and score the pair by local NCC."""
        p_k = self.map_point(vol_q, vol_k, p)
        return p_k, local_ncc(vol_q, p, vol_k, p_k, self.crop_size, self.ncc_stride, self.foreground_threshold)
