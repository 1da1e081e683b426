"""Block masking of a crop for masked-image modelling (``docs/methods.md``, section "Alice", view step 5).

The crop is split into cubic blocks (16³ voxels) and a fixed fraction of them (75 %) is masked:
either independent 3D blocks (``mode="block"``, the default) or whole columns of blocks along one
axis (``mode="column"``, as the original Alice code: a 2D block mask repeated along the axis).
Masked voxels are set to ``fill`` (0) in a copy, the student's input; the clean crop stays for the
teacher and as the reconstruction target.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data.meta_obj import get_track_meta
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import TransformBackends, convert_to_tensor

__all__ = ["MASK_MODES", "RandBlockMask", "RandBlockMaskd"]

MASK_MODES = ("block", "column")
DEFAULT_MASK_RATIO = 0.75
DEFAULT_BLOCK_SIZE = 16
DEFAULT_COLUMN_AXIS = 2
"""Columns run along the last array axis (inferior→superior after RAS orientation), as the original's z columns."""


class RandBlockMask(RandomizableTransform):
    """Mask ``round(ratio * n_blocks)`` randomly chosen blocks of a volume.

    The block grid has ``ceil(side / block_size)`` cells per axis (a partial last block counts as one).
    In ``column`` mode the grid is 2D over the axes other than ``column_axis`` and each masked cell is
    masked along the whole axis. After a call :attr:`mask` holds the voxel mask ``(D, H, W)`` and
    :attr:`block_mask` the block-level mask (3D, or 2D in column mode).

    Args:
        ratio: fraction of blocks to mask, in [0, 1].
        block_size: block side in voxels.
        mode: ``"block"`` or ``"column"``.
        column_axis: spatial array axis (0, 1, 2) the columns run along; after RAS orientation 0 runs
            left→right, 1 posterior→anterior, 2 inferior→superior.
        fill: value of masked voxels.

    Raises:
        ValueError: a ratio outside [0, 1], a block size < 1, an unknown mode or axis.
    """

    backend = [TransformBackends.TORCH]

    def __init__(
        self,
        ratio: float = DEFAULT_MASK_RATIO,
        block_size: int = DEFAULT_BLOCK_SIZE,
        mode: str = "block",
        column_axis: int = DEFAULT_COLUMN_AXIS,
        fill: float = 0.0,
    ) -> None:
        RandomizableTransform.__init__(self, prob=1.0)
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ratio must be in [0, 1], got {ratio}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if mode not in MASK_MODES:
            raise ValueError(f"mode must be one of {MASK_MODES}, got {mode!r}")
        if column_axis not in (0, 1, 2):
            raise ValueError(f"column_axis must be 0, 1 or 2, got {column_axis}")
        self.ratio = ratio
        self.block_size = block_size
        self.mode = mode
        self.column_axis = column_axis
        self.fill = fill
        self.mask: np.ndarray | None = None
        self.block_mask: np.ndarray | None = None

    def randomize(self, spatial_shape: tuple[int, int, int]) -> None:
        """Draw the masked blocks for a volume of ``spatial_shape`` from ``self.R``."""
        super().randomize(None)
        grid = [-(-int(s) // self.block_size) for s in spatial_shape]
        if self.mode == "column":
            grid[self.column_axis] = 1
        n_blocks = int(np.prod(grid))
        chosen = self.R.permutation(n_blocks)[: int(round(self.ratio * n_blocks))]
        blocks = np.zeros(n_blocks, dtype=bool)
        blocks[chosen] = True
        blocks = blocks.reshape(grid)
        full = blocks
        for axis, size in enumerate(spatial_shape):
            repeat = size if (self.mode == "column" and axis == self.column_axis) else self.block_size
            full = np.repeat(full, repeat, axis=axis)
        self.mask = np.ascontiguousarray(full[: spatial_shape[0], : spatial_shape[1], : spatial_shape[2]])
        self.block_mask = blocks.squeeze(self.column_axis) if self.mode == "column" else blocks

    def __call__(self, img: torch.Tensor, randomize: bool = True) -> torch.Tensor:
        """A masked copy of ``img`` (C, D, H, W); ``img`` is unchanged."""
        img = convert_to_tensor(img, track_meta=get_track_meta())
        if randomize:
            self.randomize(tuple(img.shape[1:]))
        if self.mask is None or self.mask.shape != tuple(img.shape[1:]):
            raise ValueError(f"no drawn mask for spatial shape {tuple(img.shape[1:])}; call randomize() first")
        mask = torch.from_numpy(self.mask).to(img.device)
        return img.masked_fill(mask[None], self.fill)


class RandBlockMaskd(RandomizableTransform, MapTransform):
    """Dictionary twin of :class:`RandBlockMask`: an independent mask per key.

    Adds ``key + output_postfix`` (the masked copy, the student input) and ``key + mask_postfix``
    (the voxel mask ``(1, D, H, W)``, float 1 = masked) for each key.

    Args:
        keys: keys of the clean crops ``(C, D, H, W)``.
        output_postfix: suffix of the masked copy.
        mask_postfix: suffix of the mask.
        allow_missing_keys: don't raise if a key is missing.
        **kwargs: :class:`RandBlockMask` arguments (``ratio``, ``block_size``, ``mode``, ...).

    Raises:
        ValueError: an empty postfix.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_postfix: str = "_masked",
        mask_postfix: str = "_mask",
        allow_missing_keys: bool = False,
        **kwargs,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob=1.0)
        if not output_postfix or not mask_postfix:
            raise ValueError("output_postfix and mask_postfix must be non-empty")
        self.masker = RandBlockMask(**kwargs)
        self.output_postfix = output_postfix
        self.mask_postfix = mask_postfix

    def set_random_state(self, seed: int | None = None, state=None) -> RandBlockMaskd:
        """Seed this transform and its array twin."""
        super().set_random_state(seed, state)
        self.masker.set_random_state(seed, state)
        return self

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        """Add the masked copy and the mask of every key."""
        d = dict(data)
        for key in self.key_iterator(d):
            d[f"{key}{self.output_postfix}"] = self.masker(d[key])
            d[f"{key}{self.mask_postfix}"] = torch.from_numpy(self.masker.mask[None].astype(np.float32))
        return d
