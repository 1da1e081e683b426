"""Grid-aligned two-scale crops of ACE-3D, with their correspondences by arithmetic.

See ``docs/methods.md`` (section "ACE-3D").

One cell lattice of side ``c`` voxels (the token stride of the feature map used) is anchored at the large
crop's corner. In cells, per axis, with the large corner ``a = 0`` and the small corner ``b = d``:

- the small crop covers cells ``[d, d + n)`` at native resolution, so small token ``s`` is cell ``d + s``;
- the large crop covers cells ``[0, 2n)`` and is average-pooled ×2 to the same ``n c`` voxels, so large
  token ``i`` covers cells ``2i`` and ``2i + 1``;
- ``d`` is even and the overlap ``[max(0, d), min(2n, d + n))`` is at least ``min_overlap`` cells.

Because ``d`` and ``n`` are even, the overlap starts and ends on large-token boundaries, and:

- *composition*: the block of small tokens ``2j + {0, 1}`` (composed feature ``j`` of the ``(n/2)³`` grid)
  lies exactly under large token ``i = j + d/2``; large token ``i`` matches composed cell ``i - d/2``;
- *decomposition*: small token ``s`` lies under sub-cell ``k = s + d`` of the ``(2n)³`` decomposed grid.

Every spatial triple here follows the order of a tensor's last three axes: (R, A, S) after
``Orientationd("RAS")``, i.e. left→right, posterior→anterior, inferior→superior. Crops are only cut
and pooled (no flip, no rotation), so the arithmetic above is all the correspondence there is.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import TransformBackends, convert_to_tensor
from torch import Tensor

__all__ = [
    "COMPOSE",
    "DECOMPOSE",
    "DEFAULT_CELL_SIZE",
    "DEFAULT_GRID_N",
    "DEFAULT_MIN_OVERLAP",
    "GridCropGeometry",
    "RandGridCropPair",
    "RandGridCropPaird",
    "flat_index",
    "grid_side",
    "matched_cells",
    "overlap_masks",
]

DEFAULT_CELL_SIZE = 16  # token stride of ViT/16 and of the Swin stride-16 stage
DEFAULT_GRID_N = 6  # n: tokens per axis of each crop (96 voxels at c = 16)
DEFAULT_MIN_OVERLAP = 2  # cells of overlap per axis, at least
SCALE = 2  # the large crop spans twice the cells and is pooled by this factor
SPATIAL_DIMS = 3
COMPOSE = "compose"  # rows: large tokens; columns: the (n/2)^3 composed grid
DECOMPOSE = "decompose"  # rows: small tokens; columns: the (2n)^3 decomposed grid


def _check_grid(n: int, cell_size: int, min_overlap: int) -> None:
    if n < SCALE or n % SCALE:
        raise ValueError(f"grid n must be even and >= {SCALE}, got {n}")
    if cell_size < SCALE or cell_size % SCALE:
        raise ValueError(f"cell_size must be even and >= {SCALE} (the large crop is pooled by 2), got {cell_size}")
    if not 1 <= min_overlap <= n:
        raise ValueError(f"min_overlap must be in 1..n={n}, got {min_overlap}")


# --------------------------------------------------------------------------------------
# Correspondences, batched: offsets (B, 3) in cells -> which token matches which cell.
# --------------------------------------------------------------------------------------
def grid_side(n: int, direction: str) -> int:
    """Side of the target grid: ``n / 2`` for ``"compose"``, ``2 n`` for ``"decompose"``.

    Raises:
        ValueError: an unknown direction.
    """
    if direction == COMPOSE:
        return n // SCALE
    if direction == DECOMPOSE:
        return n * SCALE
    raise ValueError(f"direction must be {COMPOSE!r} or {DECOMPOSE!r}, got {direction!r}")


def matched_cells(offset: Tensor, n: int, direction: str) -> tuple[Tensor, Tensor]:
    """For every token of one crop, the cell it matches in the other crop's composed/decomposed grid.

    Args:
        offset: ``(B, 3)`` integer ``d = b - a`` in cells along the last three tensor axes (R, A, S), even.
        n: tokens per axis of each crop.
        direction: ``"compose"``: rows are the large crop's ``n³`` tokens ``i`` and the cell is
            ``i - d/2`` in the ``(n/2)³`` composed grid; ``"decompose"``: rows are the small crop's ``n³``
            tokens ``s`` and the cell is ``s + d`` in the ``(2n)³`` decomposed grid.

    Returns:
        ``centres (B, n³, 3)`` long (may fall outside the grid) and ``valid (B, n³)`` bool (the row's
        token lies in the overlap); rows in raster order of the last three tensor axes (the last fastest).

    Raises:
        ValueError: an odd offset or a bad direction.
    """
    side = grid_side(n, direction)
    offset = torch.as_tensor(offset).long().reshape(-1, SPATIAL_DIMS)
    if (offset % SCALE).any():
        raise ValueError(f"grid offsets must be even, got {offset.tolist()}")
    axis = torch.arange(n, device=offset.device)
    tokens = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(1, -1, SPATIAL_DIMS)
    shift = -offset // SCALE if direction == COMPOSE else offset
    centres = tokens + shift[:, None, :]
    valid = ((centres >= 0) & (centres < side)).all(dim=-1)
    return centres, valid


def flat_index(centres: Tensor, valid: Tensor, side: int) -> Tensor:
    """Raster index ``(c0 * side + c1) * side + c2`` of each matched cell ``(c0, c1, c2)``, -1 where ``valid`` is False.

    Args:
        centres: ``(..., 3)`` cells.
        valid: ``(...)`` bool.
        side: grid side.

    Returns:
        ``(...)`` long.
    """
    c0, c1, c2 = centres.unbind(-1)
    index = (c0 * side + c1) * side + c2
    return torch.where(valid, index, torch.full_like(index, -1))


def overlap_masks(offset: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The tokens of each crop that lie in the overlap of the two crops.

    Args:
        offset: ``(B, 3)`` even offsets ``d`` in cells.
        n: tokens per axis.

    Returns:
        ``small_mask (B, n, n, n)`` and ``large_mask (B, n, n, n)``, bool.
    """
    _, small = matched_cells(offset, n, DECOMPOSE)
    _, large = matched_cells(offset, n, COMPOSE)
    shape = (-1, n, n, n)
    return small.reshape(shape), large.reshape(shape)


# --------------------------------------------------------------------------------------
# The random draw.
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GridCropGeometry:
    """Where one pair of crops was cut.

    Attributes:
        offset: ``d = b - a`` in cells along the last three tensor axes (R, A, S), every entry even.
        small_corner: first voxel of the small crop in the input volume (negative inside padding).
        large_corner: first voxel of the large crop (before pooling) in the input volume.
        n: tokens per axis of each crop.
        cell_size: voxels per cell side.
    """

    offset: tuple[int, ...]
    small_corner: tuple[int, ...]
    large_corner: tuple[int, ...]
    n: int
    cell_size: int

    def tensors(self) -> dict[str, Tensor]:
        """Offset, corners, overlap masks ``(n, n, n)`` and correspondences ``(n³,)`` as tensors.

        ``compose_index[i]``: the composed cell (raster index in ``(n/2)³``) under large token ``i``;
        ``decompose_index[s]``: the decomposed cell (raster index in ``(2n)³``) over small token ``s``;
        -1 outside the overlap.
        """
        offset = torch.tensor(self.offset, dtype=torch.long)
        out = {"offset": offset}
        for direction in (COMPOSE, DECOMPOSE):
            centres, valid = matched_cells(offset[None], self.n, direction)
            out[f"{direction}_index"] = flat_index(centres, valid, grid_side(self.n, direction))[0]
        small, large = overlap_masks(offset[None], self.n)
        out["small_mask"], out["large_mask"] = small[0], large[0]
        out["small_corner"] = torch.tensor(self.small_corner, dtype=torch.long)
        out["large_corner"] = torch.tensor(self.large_corner, dtype=torch.long)
        return out


class RandGridCropPair(RandomizableTransform):
    """Cut a grid-aligned small crop and a ×2-pooled large crop with random overlap (ACE-3D).

    Per axis, an even cell offset ``d`` with at least ``min_overlap`` cells of overlap is drawn uniformly
    among those for which both crops fit in the volume, then the large corner uniformly among the positions
    where both fit. A volume smaller than the large crop (``2 n c`` voxels) is first padded symmetrically
    with ``pad_value``; a volume that is exactly that size allows only nested crops (``0 <= d <= n``).
    The large crop is average-pooled 2×2×2, which equals trilinear resizing by ½ with
    ``align_corners=False`` and keeps every pooled voxel inside one cell.

    Args:
        n: tokens per axis of each crop (even); crops are ``n · cell_size`` voxels per side.
        cell_size: voxels per cell side, the token stride of the feature map used (even).
        min_overlap: cells of overlap per axis, at least (overlaps are even, so an odd value rounds up).
        pad_value: fill of the padding of small volumes (the preset's background, 0).

    Raises:
        ValueError: odd or too small ``n`` / ``cell_size``, or ``min_overlap`` outside ``1..n``.
    """

    backend = [TransformBackends.TORCH]

    def __init__(
        self,
        n: int = DEFAULT_GRID_N,
        cell_size: int = DEFAULT_CELL_SIZE,
        min_overlap: int = DEFAULT_MIN_OVERLAP,
        pad_value: float = 0.0,
    ) -> None:
        RandomizableTransform.__init__(self, prob=1.0)
        _check_grid(n, cell_size, min_overlap)
        self.n = n
        self.cell_size = cell_size
        self.min_overlap = min_overlap
        self.pad_value = pad_value
        self._geometry: GridCropGeometry | None = None
        self._pad: tuple[int, ...] = (0,) * SPATIAL_DIMS

    @property
    def crop_size(self) -> int:
        """Voxels per side of each output crop (and of the small crop before pooling)."""
        return self.n * self.cell_size

    @property
    def geometry(self) -> GridCropGeometry:
        """The geometry drawn by the last :meth:`randomize`.

        Raises:
            RuntimeError: nothing drawn yet.
        """
        if self._geometry is None:
            raise RuntimeError("RandGridCropPair: call randomize(spatial_shape) first")
        return self._geometry

    def randomize(self, spatial_shape: Sequence[int]) -> None:
        """Draw offsets and corners for a volume of ``spatial_shape`` (its last three axes) from ``self.R``.

        Raises:
            ValueError: ``spatial_shape`` is not 3D.
        """
        super().randomize(None)
        shape = tuple(int(s) for s in spatial_shape)
        if len(shape) != SPATIAL_DIMS:
            raise ValueError(f"RandGridCropPair needs a 3D volume, got spatial shape {shape}")
        n, c = self.n, self.cell_size
        large = SCALE * n
        pad = tuple(max(0, large * c - s) // 2 for s in shape)
        padded = tuple(max(s, large * c) for s in shape)
        offsets, smalls, larges = [], [], []
        for size, before in zip(padded, pad, strict=True):
            feasible = [
                d
                for d in range(self.min_overlap - n, large - self.min_overlap + 1)
                if d % SCALE == 0 and (max(large, d + n) - min(0, d)) * c <= size
            ]
            d = feasible[int(self.R.randint(len(feasible)))]
            low, high = -min(0, d) * c, size - max(large, d + n) * c
            corner = int(self.R.randint(low, high + 1))
            offsets.append(d)
            larges.append(corner - before)
            smalls.append(corner + d * c - before)
        self._pad = pad
        self._geometry = GridCropGeometry(tuple(offsets), tuple(smalls), tuple(larges), n, c)

    def __call__(self, img: Tensor | np.ndarray, randomize: bool = True) -> tuple[Tensor, Tensor]:
        """Cut the pair from ``img`` ``(C, D, H, W)``; read where from :attr:`geometry`.

        Returns:
            ``small (C, n c, n c, n c)`` and ``large (C, n c, n c, n c)`` (pooled), float tensors
            without metadata (the pooled crop has no single affine to carry).
        """
        img = convert_to_tensor(img, track_meta=False)
        if randomize:
            self.randomize(img.shape[1:])
        geo = self.geometry
        if not torch.is_floating_point(img):
            img = img.float()
        if any(self._pad):
            pads = []
            for before, size in zip(reversed(self._pad), reversed(img.shape[1:]), strict=True):
                pads += [before, max(0, SCALE * self.crop_size - size) - before]
            img = F.pad(img, pads, value=self.pad_value)
        side = self.crop_size
        small = self._cut(img, geo.small_corner, side)
        large = self._cut(img, geo.large_corner, SCALE * side)
        return small, F.avg_pool3d(large, SCALE)

    def _cut(self, img: Tensor, corner: Sequence[int], side: int) -> Tensor:
        start = [c + p for c, p in zip(corner, self._pad, strict=True)]
        return img[:, start[0] : start[0] + side, start[1] : start[1] + side, start[2] : start[2] + side]


class RandGridCropPaird(RandomizableTransform, MapTransform):
    """Dictionary twin of :class:`RandGridCropPair`: one draw cuts every key; geometry keys are added.

    For each key ``k``: ``k + small_postfix`` and ``k + large_postfix``, ``(C, n c, n c, n c)`` each. Shared:
    ``offset_key`` ``(3,)`` long (``d`` in cells), ``small_mask_key`` / ``large_mask_key`` ``(n, n, n)`` bool,
    ``compose_index_key`` / ``decompose_index_key`` ``(n³,)`` long (see :meth:`GridCropGeometry.tensors`),
    ``small_corner_key`` / ``large_corner_key`` ``(3,)`` long voxels of the input. All collate into batches.

    Args:
        keys: channel-first volumes ``(C, D, H, W)`` of one spatial shape.
        n: tokens per axis (even).
        cell_size: voxels per cell side (even).
        min_overlap: cells of overlap per axis, at least.
        pad_value: fill of the padding of small volumes.
        small_postfix: suffix of the small crops' keys.
        large_postfix: suffix of the large crops' keys.
        offset_key: key of the cell offset.
        small_mask_key: key of the small crop's overlap mask.
        large_mask_key: key of the large crop's overlap mask.
        compose_index_key: key of the large-token → composed-cell index.
        decompose_index_key: key of the small-token → decomposed-cell index.
        small_corner_key: key of the small crop's corner.
        large_corner_key: key of the large crop's corner.
        allow_missing_keys: don't raise if a key is missing.

    Raises:
        ValueError: bad grid arguments.
    """

    backend = RandGridCropPair.backend

    def __init__(
        self,
        keys: KeysCollection,
        n: int = DEFAULT_GRID_N,
        cell_size: int = DEFAULT_CELL_SIZE,
        min_overlap: int = DEFAULT_MIN_OVERLAP,
        pad_value: float = 0.0,
        small_postfix: str = "_small",
        large_postfix: str = "_large",
        offset_key: str = "grid_offset",
        small_mask_key: str = "small_mask",
        large_mask_key: str = "large_mask",
        compose_index_key: str = "compose_index",
        decompose_index_key: str = "decompose_index",
        small_corner_key: str = "small_corner",
        large_corner_key: str = "large_corner",
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob=1.0)
        self.cropper = RandGridCropPair(n=n, cell_size=cell_size, min_overlap=min_overlap, pad_value=pad_value)
        self.small_postfix = small_postfix
        self.large_postfix = large_postfix
        self.geometry_keys = {
            "offset": offset_key,
            "small_mask": small_mask_key,
            "large_mask": large_mask_key,
            "compose_index": compose_index_key,
            "decompose_index": decompose_index_key,
            "small_corner": small_corner_key,
            "large_corner": large_corner_key,
        }

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        """Seed this transform and its array twin."""
        super().set_random_state(seed, state)
        self.cropper.set_random_state(seed, state)
        return self

    def __call__(self, data: Mapping[Hashable, Tensor]) -> dict[Hashable, Tensor]:
        """Cut every key with one draw and add the geometry.

        Raises:
            ValueError: the keys' spatial shapes differ.
        """
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        shapes = {tuple(d[k].shape[1:]) for k in keys}
        if len(shapes) != 1:
            raise ValueError(f"RandGridCropPaird keys {keys} have different spatial shapes {sorted(shapes)}")
        self.cropper.randomize(shapes.pop())
        for key in keys:
            small, large = self.cropper(d[key], randomize=False)
            d[f"{key}{self.small_postfix}"] = small
            d[f"{key}{self.large_postfix}"] = large
        for name, tensor in self.cropper.geometry.tensors().items():
            d[self.geometry_keys[name]] = tensor
        return d
