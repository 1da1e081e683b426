"""Random box cut-out (inpainting pretext) covering at most a given fraction of the voxels.

The inpainting task of Swin UNETR self-supervised pretraining (Tang et al., CVPR 2022): the original
``aug_rand`` runs ``patch_rand_drop`` twice on every view, first filling random boxes with noise, then
(when a randomly drawn other sample of the batch is not the view's own) filling up to as much again with
that other sample's voxels at the same positions. Here the first pass is :class:`RandCutout` (one
sample, in the data pipeline) and the second :class:`RandBatchPaste` (it needs the batch, so the method
runs it). Both place boxes with :class:`CutoutBoxes`: the original draws boxes until their summed
volume reaches a random budget and may overshoot it; here boxes are painted one at a time until their
union reaches the drawn target, and a box that would take the union past ``max_fraction`` is dropped,
so the covered fraction never exceeds the cap and is reported exactly.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data.meta_obj import get_track_meta
from monai.transforms import MapTransform, Randomizable, RandomizableTransform
from monai.utils import TransformBackends, convert_to_tensor

__all__ = ["DEFAULT_MAX_FRACTION", "FILL_MODES", "CutoutBoxes", "RandBatchPaste", "RandCutout", "RandCutoutd"]

FILL_MODES = ("noise", "zero")
DEFAULT_MAX_FRACTION = 0.3
DEFAULT_MIN_BLOCK = 0.05  # box side as a fraction of the axis length, as the original's tolerance
DEFAULT_MAX_BLOCK = 0.25  # as the original's max_block_sz
DEFAULT_MAX_BOXES = 128  # union reaches ~35 % at the default box sizes (mean box ~0.34 % of the volume)


class CutoutBoxes:
    """Draws axis-aligned boxes whose union covers a random fraction of a volume, at most ``max_fraction``.

    A target fraction is drawn uniformly in ``[min_fraction, max_fraction]``; ``max_boxes`` boxes with
    sides drawn uniformly in ``[min_block, max_block]`` of each axis are placed inside the volume; the
    shortest prefix of them whose union reaches the target is used, less its last box if that box takes
    the union past ``max_fraction``.

    Args:
        max_fraction: cap on the covered fraction of voxels, in (0, 1].
        min_fraction: lower end of the drawn target fraction, in [0, max_fraction].
        min_block: smallest box side as a fraction of the axis length (at least one voxel).
        max_block: largest box side as a fraction of the axis length; a single box must fit the cap,
            so ``max_block ** ndim <= max_fraction`` is required when drawing.
        max_boxes: number of candidate boxes drawn per call.

    Raises:
        ValueError: a fraction or block size out of range, or ``max_boxes < 1``.
    """

    def __init__(
        self,
        max_fraction: float = DEFAULT_MAX_FRACTION,
        min_fraction: float = 0.0,
        min_block: float = DEFAULT_MIN_BLOCK,
        max_block: float = DEFAULT_MAX_BLOCK,
        max_boxes: int = DEFAULT_MAX_BOXES,
    ) -> None:
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
        self.max_fraction = max_fraction
        self.min_fraction = min_fraction
        self.min_block = min_block
        self.max_block = max_block
        self.max_boxes = max_boxes

    def draw(
        self, rng: np.random.RandomState, spatial_shape: tuple[int, ...]
    ) -> tuple[np.ndarray, np.ndarray, float]:
        """Draw the boxes for a volume of ``spatial_shape`` from ``rng``.

        Returns:
            ``(boxes, mask, fraction)``: the used boxes ``(n, ndim, 2)`` as start/stop voxel indices, the
            covered voxels (bool, ``spatial_shape``) and their fraction of the volume.

        Raises:
            ValueError: ``max_block`` gives single boxes larger than ``max_fraction`` in this many dims.
        """
        ndim = len(spatial_shape)
        if self.max_block**ndim > self.max_fraction:
            raise ValueError(
                f"max_block={self.max_block} gives boxes larger than max_fraction={self.max_fraction} in {ndim}D"
            )
        target = rng.uniform(self.min_fraction, self.max_fraction)
        sizes = np.asarray(spatial_shape)
        frac = rng.uniform(self.min_block, self.max_block, size=(self.max_boxes, ndim))
        sides = np.clip(np.floor(frac * sizes), 1, sizes).astype(np.int64)
        starts = np.floor(rng.uniform(size=sides.shape) * (sizes - sides + 1)).astype(np.int64)
        boxes = np.stack([starts, starts + sides], axis=-1)
        mask = np.zeros(tuple(spatial_shape), dtype=bool)
        covered, used = 0, 0
        for box in boxes:
            region = mask[tuple(slice(lo, hi) for lo, hi in box)]  # a view: painting it paints the mask
            union = covered + region.size - int(np.count_nonzero(region))
            if union / mask.size > self.max_fraction:
                break
            region[...] = True
            covered, used = union, used + 1
            if covered / mask.size >= target:
                break
        return boxes[:used], mask, covered / mask.size


class RandCutout(RandomizableTransform):
    """Cut random axis-aligned boxes (:class:`CutoutBoxes`) out of a volume and fill them with noise or zeros.

    After a call, :attr:`fraction` is the covered fraction of voxels, :attr:`mask` the covered voxels
    (spatial shape) and :attr:`boxes` the used boxes as ``(n, ndim, 2)`` start/stop indices.
    Noise is standard normal, min-max scaled to [0, 1] over the filled voxels of each channel (as the
    original), which suits images scaled to [0, 1] by the presets.

    Args:
        max_fraction: cap on the covered fraction of voxels, in (0, 1].
        min_fraction: lower end of the drawn target fraction, in [0, max_fraction].
        min_block: smallest box side as a fraction of the axis length.
        max_block: largest box side as a fraction of the axis length.
        max_boxes: number of candidate boxes drawn per call.
        fill: ``"noise"`` or ``"zero"``.

    Raises:
        ValueError: a bad box setting (see :class:`CutoutBoxes`) or an unknown ``fill``.
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
        self.box_sampler = CutoutBoxes(max_fraction, min_fraction, min_block, max_block, max_boxes)
        if fill not in FILL_MODES:
            raise ValueError(f"fill must be one of {FILL_MODES}, got {fill!r}")
        self.fill = fill
        self.mask: np.ndarray | None = None
        self.boxes: np.ndarray | None = None
        self.fraction = 0.0
        self._noise: np.ndarray | None = None

    def randomize(self, spatial_shape: tuple[int, ...], num_channels: int = 1) -> None:
        """Draw the boxes, the mask and the fill values for a volume of ``spatial_shape`` from ``self.R``."""
        super().randomize(None)
        self.boxes, self.mask, self.fraction = self.box_sampler.draw(self.R, tuple(spatial_shape))
        n_fill = int(np.count_nonzero(self.mask))
        if self.fill == "noise" and n_fill:
            noise = self.R.standard_normal(size=(num_channels, n_fill))
            lo, hi = noise.min(axis=1, keepdims=True), noise.max(axis=1, keepdims=True)
            self._noise = ((noise - lo) / np.maximum(hi - lo, np.finfo(np.float64).tiny)).astype(np.float32)
        else:
            self._noise = np.zeros((num_channels, n_fill), dtype=np.float32)

    def __call__(self, img: torch.Tensor, randomize: bool = True) -> torch.Tensor:
        """Return a cut-out copy of ``img`` (C, *spatial); ``img`` itself is not modified."""
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
    tensor) to ``key + fraction_postfix``; with ``mask_postfix`` the covered-voxel mask (1, *spatial) is
    stored too. All keys must share one spatial shape; use one instance per view for independent boxes.

    Args:
        keys: keys of the channel-first volumes (C, *spatial) to cut.
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


class RandBatchPaste(Randomizable):
    """The original's second cut-out pass: boxes of a sample are overwritten by another sample of the batch.

    For each sample ``i`` a partner ``j`` is drawn uniformly from ``0..B-1``; when ``j != i`` (so with
    probability ``(B - 1) / B``, as the original ``aug_rand``; never for ``B = 1``), boxes drawn by
    :class:`CutoutBoxes` are filled with ``source[j]`` at the same positions. After a call,
    :attr:`partners` holds ``j`` per sample (``i`` where nothing was pasted), :attr:`masks` the pasted
    voxels (B, *spatial) and :attr:`fractions` their fraction per sample (B,). Every draw comes from
    ``self.R`` (seed it with ``set_random_state``); it acts on a batch, so it is not a per-sample transform.

    Args:
        max_fraction: cap on the pasted fraction of each sample's voxels, in (0, 1].
        min_fraction: lower end of the drawn target fraction.
        min_block: smallest box side as a fraction of the axis length.
        max_block: largest box side as a fraction of the axis length.
        max_boxes: number of candidate boxes drawn per pasted sample.

    Raises:
        ValueError: a bad box setting (see :class:`CutoutBoxes`).
    """

    def __init__(
        self,
        max_fraction: float = DEFAULT_MAX_FRACTION,
        min_fraction: float = 0.0,
        min_block: float = DEFAULT_MIN_BLOCK,
        max_block: float = DEFAULT_MAX_BLOCK,
        max_boxes: int = DEFAULT_MAX_BOXES,
    ) -> None:
        self.box_sampler = CutoutBoxes(max_fraction, min_fraction, min_block, max_block, max_boxes)
        self.partners: np.ndarray | None = None
        self.masks: np.ndarray | None = None
        self.fractions: np.ndarray | None = None

    def randomize(self, batch_size: int, spatial_shape: tuple[int, ...]) -> None:
        """Draw each sample's partner and, where it is another sample, its boxes, from ``self.R``."""
        self.partners = np.arange(batch_size)
        self.masks = np.zeros((batch_size, *spatial_shape), dtype=bool)
        self.fractions = np.zeros(batch_size)
        for i in range(batch_size):
            j = int(self.R.randint(batch_size))
            if j != i:
                self.partners[i] = j
                _, self.masks[i], self.fractions[i] = self.box_sampler.draw(self.R, tuple(spatial_shape))

    def __call__(self, img: torch.Tensor, source: torch.Tensor, randomize: bool = True) -> torch.Tensor:
        """Return a copy of ``img`` (B, C, *spatial) with the drawn boxes taken from ``source`` (same shape).

        Raises:
            ValueError: ``img`` and ``source`` differ in shape, or the drawn masks do not fit them.
        """
        if img.shape != source.shape or img.ndim < 3:
            raise ValueError(
                f"img and source must both be (B, C, *spatial), got {tuple(img.shape)} and {tuple(source.shape)}"
            )
        if randomize:
            self.randomize(img.shape[0], tuple(img.shape[2:]))
        if self.masks is None or self.partners is None:
            raise RuntimeError("call randomize() before applying RandBatchPaste with randomize=False")
        if self.masks.shape != (img.shape[0], *img.shape[2:]):
            raise ValueError(f"image shape {tuple(img.shape)} does not match the drawn masks {self.masks.shape}")
        masks = torch.from_numpy(self.masks).to(img.device).unsqueeze(1)
        partners = torch.from_numpy(self.partners).to(img.device)
        return torch.where(masks, source[partners].to(img.dtype), img)
