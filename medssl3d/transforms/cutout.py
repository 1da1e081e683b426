"""Random box cut-out (inpainting pretext) covering at most a given fraction of the voxels.

The inpainting task of Swin UNETR self-supervised pretraining (Tang et al., CVPR 2022,
``patch_rand_drop``): random boxes are filled with noise and the network restores the volume.
The original loop draws boxes until a randomly drawn voxel budget is reached and may overshoot it;
here all candidate boxes are drawn at once, the union of every prefix of them is measured by
rasterising the boxes in vectorised chunks, and the shortest prefix reaching the target is kept,
cut back while its union exceeds ``max_fraction``; so the covered fraction never exceeds the cap
and is reported exactly.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data.meta_obj import get_track_meta
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import TransformBackends, convert_to_tensor

__all__ = ["FILL_MODES", "RandCutout", "RandCutoutd"]

FILL_MODES = ("noise", "zero")
DEFAULT_MAX_FRACTION = 0.3
DEFAULT_MIN_BLOCK = 0.05  # box side as a fraction of the axis length, as the original's tolerance
DEFAULT_MAX_BLOCK = 0.25  # as the original's max_block_sz
DEFAULT_MAX_BOXES = 128  # union reaches ~35 % at the default box sizes (mean box ~0.34 % of the volume)
BOX_CHUNK = 16  # boxes rasterised at once: memory is BOX_CHUNK bytes per voxel


def _rasterise(boxes: np.ndarray, spatial_shape: tuple[int, ...]) -> np.ndarray:
    """Membership of every voxel in every box: bool (*spatial_shape, n) for boxes (n, ndim, 2)."""
    ndim, n = len(spatial_shape), boxes.shape[0]
    inside = []
    for axis, size in enumerate(spatial_shape):
        idx = np.arange(size)[:, None]
        hit = (idx >= boxes[None, :, axis, 0]) & (idx < boxes[None, :, axis, 1])  # (size, n)
        inside.append(hit.reshape((1,) * axis + (size,) + (1,) * (ndim - axis - 1) + (n,)))
    return np.logical_and.reduce(np.broadcast_arrays(*inside))


class RandCutout(RandomizableTransform):
    """Cut random axis-aligned boxes out of a volume and fill them with noise or zeros.

    A target fraction is drawn uniformly in ``[min_fraction, max_fraction]``; ``max_boxes`` boxes with
    sides drawn uniformly in ``[min_block, max_block]`` of each axis are placed inside the volume; the
    shortest prefix of them whose union reaches the target is used, shortened while its union exceeds
    ``max_fraction``. After a call, :attr:`fraction` is the covered fraction of voxels, :attr:`mask`
    the covered voxels (D, H, W) and :attr:`boxes` the used boxes as ``(n, ndim, 2)`` start/stop indices.

    Noise is standard normal, min-max scaled to [0, 1] over the filled voxels of each channel (as the
    original), which suits images scaled to [0, 1] by the presets.

    Args:
        max_fraction: cap on the covered fraction of voxels, in (0, 1].
        min_fraction: lower end of the drawn target fraction, in [0, max_fraction].
        min_block: smallest box side as a fraction of the axis length (at least one voxel).
        max_block: largest box side as a fraction of the axis length; a single box must fit the cap,
            so ``max_block ** ndim <= max_fraction`` is required at call time.
        max_boxes: number of candidate boxes drawn per call.
        fill: ``"noise"`` or ``"zero"``.

    Raises:
        ValueError: a fraction or block size out of range, ``max_boxes < 1`` or an unknown ``fill``.
    """

    backend = [TransformBackends.TORCH]

    def __init__(
        self,
        max_fraction: float = DEFAULT_MAX_FRACTION,
        min_fraction: float = 0.0,
        min_block: float = DEFAULT_MIN_BLOCK,
        max_block: float = DEFAULT_MAX_BLOCK,
        max_boxes: int = DEFAULT_MAX_BOXES,
        fill: str = "noise",
    ) -> None:
        RandomizableTransform.__init__(self, prob=1.0)
        if not 0.0 < max_fraction <= 1.0:
            raise ValueError(f"max_fraction must be in (0, 1], got {max_fraction}")
        if not 0.0 <= min_fraction <= max_fraction:
            raise ValueError(f"min_fraction must be in [0, max_fraction={max_fraction}], got {min_fraction}")
        if not 0.0 < min_block <= max_block <= 1.0:
            raise ValueError(
                f"need 0 < min_block <= max_block <= 1, got min_block={min_block}, max_block={max_block}"
            )
        if max_boxes < 1:
            raise ValueError(f"max_boxes must be >= 1, got {max_boxes}")
        if fill not in FILL_MODES:
            raise ValueError(f"fill must be one of {FILL_MODES}, got {fill!r}")
        self.max_fraction = max_fraction
        self.min_fraction = min_fraction
        self.min_block = min_block
        self.max_block = max_block
        self.max_boxes = max_boxes
        self.fill = fill
        self.mask: np.ndarray | None = None
        self.boxes: np.ndarray | None = None
        self.fraction = 0.0
        self._noise: np.ndarray | None = None

    def _draw_boxes(self, spatial_shape: tuple[int, ...]) -> np.ndarray:
        """Candidate boxes (max_boxes, ndim, 2) as start/stop voxel indices, each fully inside."""
        sizes = np.asarray(spatial_shape)
        frac = self.R.uniform(self.min_block, self.max_block, size=(self.max_boxes, sizes.size))
        sides = np.clip(np.floor(frac * sizes), 1, sizes).astype(np.int64)
        starts = np.floor(self.R.uniform(size=sides.shape) * (sizes - sides + 1)).astype(np.int64)
        return np.stack([starts, starts + sides], axis=-1)

    def randomize(self, spatial_shape: tuple[int, ...], num_channels: int = 1) -> None:
        """Draw the boxes, the mask and the fill values for a volume of ``spatial_shape`` from ``self.R``."""
        super().randomize(None)
        ndim = len(spatial_shape)
        if self.max_block**ndim > self.max_fraction:
            raise ValueError(
                f"max_block={self.max_block} gives boxes larger than max_fraction="
                f"{self.max_fraction} in {ndim}D"
            )
        target = self.R.uniform(self.min_fraction, self.max_fraction)
        boxes = self._draw_boxes(tuple(spatial_shape))
        # Index of the first box covering each voxel (max_boxes where none): the first k boxes cover
        # exactly the voxels with first < k. Boxes are rasterised a chunk at a time to bound memory,
        # stopping once the union reaches the target (later boxes cannot be used then).
        first = np.full(tuple(spatial_shape), self.max_boxes, dtype=np.int32)
        for lo in range(0, self.max_boxes, BOX_CHUNK):
            in_box = _rasterise(boxes[lo : lo + BOX_CHUNK], tuple(spatial_shape))
            new = in_box.any(axis=-1) & (first == self.max_boxes)
            first[new] = in_box.argmax(axis=-1)[new] + lo
            if np.count_nonzero(first < self.max_boxes) >= target * first.size:
                break
        counts = np.bincount(first.ravel(), minlength=self.max_boxes + 1)[: self.max_boxes]
        coverage = np.cumsum(counts) / first.size  # coverage[k - 1]: union of the first k boxes
        k_target = min(int(np.searchsorted(coverage, target)) + 1, self.max_boxes)
        k_cap = int(np.count_nonzero(coverage <= self.max_fraction))
        k = min(k_target, k_cap)
        self.boxes = boxes[:k]
        self.mask = first < k
        self.fraction = float(coverage[k - 1]) if k else 0.0
        n_fill = int(np.count_nonzero(self.mask))
        if self.fill == "noise" and n_fill:
            noise = self.R.standard_normal(size=(num_channels, n_fill))
            lo, hi = noise.min(axis=1, keepdims=True), noise.max(axis=1, keepdims=True)
            self._noise = ((noise - lo) / np.maximum(hi - lo, np.finfo(np.float64).tiny)).astype(np.float32)
        else:
            self._noise = np.zeros((num_channels, n_fill), dtype=np.float32)

    def __call__(self, img: torch.Tensor, randomize: bool = True) -> torch.Tensor:
        """Return a cut-out copy of ``img`` (C, D, H, W); ``img`` itself is not modified."""
        img = convert_to_tensor(img, track_meta=get_track_meta())
        if randomize:
            self.randomize(tuple(img.shape[1:]), num_channels=img.shape[0])
        if self.mask is None or self._noise is None:
            raise RuntimeError("call randomize() before applying RandCutout with randomize=False")
        if tuple(self.mask.shape) != tuple(img.shape[1:]) or self._noise.shape[0] != img.shape[0]:
            raise ValueError(
                f"image shape {tuple(img.shape)} does not match the drawn mask "
                f"{tuple(self.mask.shape)} with {self._noise.shape[0]} channel(s)"
            )
        out = img.clone()
        mask = torch.from_numpy(self.mask).to(img.device)
        out[:, mask] = torch.from_numpy(self._noise).to(device=img.device, dtype=img.dtype)
        return out


class RandCutoutd(RandomizableTransform, MapTransform):
    """Dictionary twin of :class:`RandCutout`: one draw cuts every key; the clean volumes stay as they are.

    The cut-out copy of ``key`` goes to ``key + output_postfix`` and the covered fraction (a 0-d float
    tensor) to ``key + fraction_postfix``; with ``mask_postfix`` the covered-voxel mask (1, D, H, W) is
    stored too. All keys must share one spatial shape; use one instance per view for independent boxes.

    Args:
        keys: keys of the channel-first volumes (C, D, H, W) to cut.
        output_postfix: suffix of the key receiving the cut-out volume.
        fraction_postfix: suffix of the key receiving the covered fraction.
        mask_postfix: suffix of the key receiving the boolean mask, or None to not store it.
        allow_missing_keys: don't raise if a key is missing.
        **kwargs: :class:`RandCutout` arguments (``max_fraction``, ``min_block``, ``fill``, ...).
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_postfix: str = "_cutout",
        fraction_postfix: str = "_cutout_fraction",
        mask_postfix: str | None = None,
        allow_missing_keys: bool = False,
        **kwargs,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob=1.0)
        if not output_postfix:
            raise ValueError("output_postfix must be non-empty, otherwise the clean target is overwritten")
        self.cutout = RandCutout(**kwargs)
        self.output_postfix = output_postfix
        self.fraction_postfix = fraction_postfix
        self.mask_postfix = mask_postfix

    def set_random_state(self, seed: int | None = None, state=None) -> RandCutoutd:
        """Seed this transform and its array twin."""
        super().set_random_state(seed, state)
        self.cutout.set_random_state(seed, state)
        return self

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        """Add the cut-out copy, the covered fraction (and the mask) of every key."""
        d = dict(data)
        first_key = self.first_key(d)
        if first_key == ():
            return d
        first = d[first_key]
        self.cutout.randomize(tuple(first.shape[1:]), num_channels=first.shape[0])
        for key in self.key_iterator(d):
            d[f"{key}{self.output_postfix}"] = self.cutout(d[key], randomize=False)
            d[f"{key}{self.fraction_postfix}"] = torch.tensor(self.cutout.fraction, dtype=torch.float32)
            if self.mask_postfix is not None:
                d[f"{key}{self.mask_postfix}"] = torch.from_numpy(self.cutout.mask[None].copy())
        return d
