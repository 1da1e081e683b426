"""Fused Swin window attention, a drop-in for MONAI's Swin stages in training and inference.

MONAI's ``WindowAttention`` materialises the ``(windows, heads, n, n)`` attention matrix with
``bmm``, adds the relative-position bias and the shifted-window mask, and runs softmax on it; its
own ``scaled_dot_product_attention`` path serves inference only, because no fused kernel gives
the gradient of an additive mask. With head widths of 4 to 16 channels and ``n = 343`` tokens per
window, those ``n x n`` passes over memory, and the pad / roll / partition copies around them,
are most of a Swin UNETR training step on a CPU.

Here:

- the windows of a shifted block are grouped by their mask pattern (at most ``2**spatial_dims``:
  the mask depends only on whether a window is the last along each axis), so the bias and the
  mask fold into one additive mask ``(1, heads, n, n)`` per group that broadcasts over its windows;
- the forward runs ATen's fused (flash) kernel per group; the backward recomputes the attention
  probabilities in cache-sized chunks of windows and returns the gradient of the bias too;
- a block's pad, cyclic shift, window partition and group sort are one precomputed row gather
  (and their inverse another), cached per input shape by the stage.

The kernels are in :mod:`medssl3d.networks.window_attention_kernels`.

Parameters, buffers and state-dict keys are MONAI's, so weights move freely between the two, and
outputs and gradients equal MONAI's up to rounding. :func:`fuse_window_attention` swaps the fused
modules into a MONAI ``SwinTransformer`` / ``SwinUNETR`` in place.

Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows", ICCV 2021.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.networks.nets.swin_unetr import (
    BasicLayer,
    PatchMerging,
    PatchMergingV2,
    SwinTransformer,
    SwinTransformerBlock,
    WindowAttention,
    compute_mask,
    get_window_size,
)
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from medssl3d.networks.window_attention_kernels import grouped_window_attention

__all__ = [
    "FusedBasicLayer",
    "FusedSwinTransformer",
    "FusedSwinTransformerBlock",
    "FusedWindowAttention",
    "WindowGroups",
    "WindowLayout",
    "build_window_layout",
    "fuse_window_attention",
    "grouped_window_attention",
    "merge_patches",
]

LAYOUT_CACHE_SIZE = 8
"""Window layouts a stage keeps (one per input shape and block kind in use)."""
MASKED = float("-inf")
"""Additive mask between tokens of different shifted regions (MONAI adds -100, see :meth:`WindowGroups.from_dense`)."""


# --------------------------------------------------------------------------------------
# Shifted-window masks grouped by pattern, and the gather that sorts windows by group.
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WindowGroups:
    """The windows of one image grouped by their shifted-window mask.

    Attributes:
        masks: ``(G, n, n)`` the distinct additive masks: 0 within a region, :data:`MASKED` across.
        order: ``(num_windows,)`` window indices sorted by group.
        counts: windows per group, in ``order``.
    """

    masks: Tensor
    order: Tensor
    counts: tuple[int, ...]

    @property
    def num_windows(self) -> int:
        """Windows per image."""
        return int(self.order.numel())

    @classmethod
    def from_dense(cls, mask: Tensor) -> WindowGroups:
        """Group the windows of MONAI's dense mask.

        Args:
            mask: ``(num_windows, n, n)`` as MONAI's ``compute_mask`` returns it: 0 between tokens
                of one region, nonzero (-100) across regions.
        """
        nw = mask.shape[0]
        patterns, group = torch.unique(mask.reshape(nw, -1), dim=0, return_inverse=True)
        # MONAI's -100 puts exp() of masked scores below float32's normal range, where denormal
        # arithmetic slows exp tenfold; -inf gives the same probabilities (0 instead of ~1e-44).
        masks = torch.zeros_like(patterns).masked_fill_(patterns != 0, MASKED)
        return cls(
            masks=masks.view(-1, *mask.shape[1:]),
            order=torch.argsort(group, stable=True),
            counts=tuple(torch.bincount(group, minlength=patterns.shape[0]).tolist()),
        )

    def batch_order(self, batch: int) -> tuple[Tensor, tuple[int, ...]]:
        """Row order of ``batch`` images' windows (image-major, as MONAI lays them) sorted group-major.

        Returns:
            ``(batch * num_windows,)`` indices and the windows per group over the batch.
        """
        nw = self.num_windows
        offsets = torch.arange(batch, device=self.order.device)[:, None] * nw
        parts = [(offsets + w[None]).reshape(-1) for w in self.order.split(self.counts)]
        return torch.cat(parts), tuple(batch * c for c in self.counts)


@dataclass(frozen=True)
class WindowLayout:
    """Where the tokens of a ``(B, *spatial, C)`` map go in one block's windows, and back.

    Window slots run group-major (group, image, window, token) so that each group of windows
    sharing a mask is a contiguous run of rows.

    Attributes:
        gather: ``(slots,)`` the flat token (``image * L + raster index``) in each slot; 0 in padding slots.
        scatter: ``(B * L,)`` the slot of each token.
        pad_slots: slots holding the zero padding MONAI adds before windowing.
        rows: windows per group, over the batch.
        masks: ``(G, n, n)`` additive masks of the groups, or None for a block without shift (G = 1).
        window_tokens: ``n``, tokens per window.
    """

    gather: Tensor
    scatter: Tensor
    pad_slots: Tensor
    rows: tuple[int, ...]
    masks: Tensor | None
    window_tokens: int


def build_window_layout(
    batch: int,
    spatial: Sequence[int],
    window_size: Sequence[int],
    shift_size: Sequence[int],
    device: torch.device | str | None = None,
) -> WindowLayout:
    """The layout of one MONAI Swin block: pad to whole windows, roll by ``-shift``, partition, group.

    Args:
        batch: images B.
        spatial: the map's spatial shape.
        window_size: the block's window (after MONAI's ``get_window_size``).
        shift_size: its shift (all zero for a block without shift).
        device: where the index tensors live.

    Returns:
        The slot maps that reproduce MONAI's ``F.pad`` / ``torch.roll`` / ``window_partition``
        (and ``window_reverse`` / ``torch.roll`` / crop), with windows sorted by mask pattern.
    """
    spatial, window, shift = (tuple(int(v) for v in t) for t in (spatial, window_size, shift_size))
    padded = tuple(math.ceil(s / w) * w for s, w in zip(spatial, window, strict=True))
    grid = tuple(p // w for p, w in zip(padded, window, strict=True))
    dims = len(spatial)
    # coordinates of each slot in the padded, rolled map, in window_partition's order:
    # (window index along each axis..., position in the window along each axis...)
    axes = torch.meshgrid(
        *[torch.arange(g, device=device) for g in grid],
        *[torch.arange(w, device=device) for w in window],
        indexing="ij",
    )
    flat = torch.zeros((), dtype=torch.long, device=device)
    valid = torch.ones((), dtype=torch.bool, device=device)
    for a in range(dims):
        # the rolled map at p holds the padded map at (p + shift) mod padded
        source = (axes[a] * window[a] + axes[dims + a] + shift[a]) % padded[a]
        valid = valid & (source < spatial[a])
        flat = flat * spatial[a] + source.clamp(max=spatial[a] - 1)
    n = math.prod(window)
    nw = math.prod(grid)
    flat, valid = flat.reshape(nw, n), valid.reshape(nw, n)
    if any(shift):
        groups = WindowGroups.from_dense(compute_mask(list(padded), window, shift, device))
        masks = groups.masks
    else:
        groups = WindowGroups(
            masks=torch.zeros(1, n, n, device=device), order=torch.arange(nw, device=device), counts=(nw,)
        )
        masks = None
    rows_order, rows = groups.batch_order(batch)
    tokens = math.prod(spatial)
    image = torch.div(rows_order, nw, rounding_mode="floor")
    window_of_row = rows_order % nw
    gather = (flat[window_of_row] + image[:, None] * tokens).reshape(-1)
    valid = valid[window_of_row].reshape(-1)
    slots = torch.arange(gather.numel(), device=device)
    scatter = torch.empty(batch * tokens, dtype=torch.long, device=device)
    scatter[gather[valid]] = slots[valid]
    gather = gather.masked_fill(~valid, 0)
    return WindowLayout(
        gather=gather, scatter=scatter, pad_slots=slots[~valid], rows=rows, masks=masks, window_tokens=n
    )


def _gather_rows(x: Tensor, index: Tensor, zero_rows: Tensor | None) -> Tensor:
    out = x.index_select(0, index)
    return out if zero_rows is None or not zero_rows.numel() else out.index_fill_(0, zero_rows, 0)


class _RowGather(torch.autograd.Function):
    """``x[index]`` with ``zero_rows`` of the result zeroed, whose gradient is again a gather.

    ``index`` must hit every row of ``x`` it does not zero exactly once (a permutation with
    padding), so the gradient is ``grad[inverse]`` with ``inverse_zero_rows`` zeroed: no
    scatter-add, no zero-filled buffer.
    """

    @staticmethod
    def forward(
        ctx, x: Tensor, index: Tensor, zero_rows: Tensor | None, inverse: Tensor, inverse_zero_rows: Tensor | None
    ) -> Tensor:
        ctx.inverse, ctx.inverse_zero_rows = inverse, inverse_zero_rows
        return _gather_rows(x, index, zero_rows)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        return _gather_rows(grad, ctx.inverse, ctx.inverse_zero_rows), None, None, None, None


def _to_windows(x: Tensor, layout: WindowLayout) -> Tensor:
    """``(B * L, C)`` tokens -> ``(slots, C)`` window rows (padding zero)."""
    return _RowGather.apply(x, layout.gather, layout.pad_slots, layout.scatter, None)


def _from_windows(x: Tensor, layout: WindowLayout) -> Tensor:
    """``(slots, C)`` window rows -> ``(B * L, C)`` tokens (padding dropped)."""
    return _RowGather.apply(x, layout.scatter, None, layout.gather, layout.pad_slots)


# --------------------------------------------------------------------------------------
# Modules.
# --------------------------------------------------------------------------------------
class FusedWindowAttention(WindowAttention):
    """MONAI's ``WindowAttention`` (same parameters, buffers and keys) with a fused kernel.

    ``forward(x, mask)`` takes what MONAI's takes (``mask`` None or the dense ``(nw, n, n)``
    shift mask), a :class:`WindowGroups`, or the :class:`WindowLayout` of windows already sorted
    by group (what :class:`FusedSwinTransformerBlock` passes), and returns what MONAI's returns.
    Attention dropout, which the fused kernels cannot apply, falls back to MONAI's computation.
    """

    @classmethod
    def from_monai(cls, attn: WindowAttention) -> FusedWindowAttention:
        """The same module (sharing its parameters) as a :class:`FusedWindowAttention`."""
        return _adopt(cls, attn)

    def relative_bias(self, n: int) -> Tensor:
        """The relative-position bias ``(heads, n, n)`` for windows of ``n`` tokens, as MONAI indexes it."""
        index = self.relative_position_index[:n, :n].reshape(-1)  # type: ignore[index]
        return self.relative_position_bias_table[index].view(n, n, -1).permute(2, 0, 1)

    def forward(self, x: Tensor, mask: Tensor | WindowGroups | WindowLayout | None) -> Tensor:
        """Attend within each window.

        Args:
            x: ``(B, n, C)`` windows of ``n`` tokens: for a dense mask or :class:`WindowGroups`, the
                windows of each image consecutive (MONAI's order); for a :class:`WindowLayout`, its slots.
            mask: None (no shift), MONAI's dense shift mask ``(nw, n, n)``, its :class:`WindowGroups`,
                or a :class:`WindowLayout`.

        Returns:
            ``(B, n, C)``.
        """
        if torch.jit.is_tracing():  # TorchScript cannot record the fused kernels' autograd functions
            return super().forward(x, mask if mask is None or isinstance(mask, Tensor) else _dense(mask))
        if isinstance(mask, Tensor):
            mask = WindowGroups.from_dense(mask)
        if self.training and self.attn_drop.p > 0:
            return super().forward(x, None if mask is None else _dense(mask))
        if isinstance(mask, WindowGroups):  # MONAI's window order: sort by group and back
            order, rows = mask.batch_order(x.shape[0] // mask.num_windows)
            order = order.to(x.device)
            out = self._attend(x.index_select(0, order), rows, mask.masks)
            return out.index_select(0, torch.argsort(order))
        if mask is None:
            return self._attend(x, (x.shape[0],), None)
        return self._attend(x, mask.rows, mask.masks)

    def _attend(self, x: Tensor, rows: tuple[int, ...], masks: Tensor | None) -> Tensor:
        b, n, c = x.shape
        h = self.num_heads
        qkv = self.qkv(x).view(b, n, 3, h, c // h)
        bias = self.relative_bias(n).unsqueeze(0)
        if masks is not None:
            bias = bias + masks.to(bias).unsqueeze(1)
        out = grouped_window_attention(qkv, bias, rows, self.scale)
        return self.proj_drop(self.proj(out.reshape(b, n, c)))


def _dense(mask: WindowGroups | WindowLayout) -> Tensor:
    """MONAI's ``(nw, n, n)`` mask of one image, in MONAI's window order.

    Raises:
        ValueError: for a :class:`WindowLayout` (its windows are no longer in MONAI's order).
    """
    if not isinstance(mask, WindowGroups):
        raise ValueError("attention dropout needs MONAI's window order; fuse_window_attention skips such stages")
    group_of = torch.repeat_interleave(
        torch.arange(len(mask.counts), device=mask.masks.device),
        torch.tensor(mask.counts, device=mask.masks.device),
    )
    return mask.masks[group_of[torch.argsort(mask.order).to(mask.masks.device)]]


class FusedSwinTransformerBlock(SwinTransformerBlock):
    """MONAI's ``SwinTransformerBlock`` (same keys) whose pad / shift / partition is one cached gather.

    Given the :class:`LayoutCache` of its :class:`FusedBasicLayer` as ``mask_matrix``, the
    attention half (``forward_part1``) gathers the normalised tokens straight into group-sorted
    windows and back; given anything else it is MONAI's. The MLP half and checkpointing are MONAI's.
    """

    @classmethod
    def from_monai(cls, block: SwinTransformerBlock) -> FusedSwinTransformerBlock:
        """The same block (sharing its parameters) as a :class:`FusedSwinTransformerBlock`."""
        return _adopt(cls, block)

    def forward_part1(self, x: Tensor, mask_matrix: LayoutCache | Tensor | None) -> Tensor:
        """Windowed attention on ``x`` ``(B, *spatial, C)``, channels last; returns the same shape."""
        if not isinstance(mask_matrix, LayoutCache):
            return super().forward_part1(x, mask_matrix)
        b, *spatial, c = x.shape
        window_size, shift_size = get_window_size(spatial, self.window_size, self.shift_size)
        layout = mask_matrix.get(b, spatial, window_size, shift_size, x.device)
        windows = _to_windows(self.norm1(x).reshape(-1, c), layout)
        out = self.attn(windows.view(-1, layout.window_tokens, c), layout)
        return _from_windows(out.reshape(-1, c), layout).view(x.shape)


class LayoutCache:
    """The :class:`WindowLayout` of the last :data:`LAYOUT_CACHE_SIZE` (shape, window, shift, device) keys."""

    def __init__(self) -> None:
        self._layouts: OrderedDict[tuple, WindowLayout] = OrderedDict()

    def __len__(self) -> int:
        return len(self._layouts)

    def get(
        self,
        batch: int,
        spatial: Sequence[int],
        window_size: Sequence[int],
        shift_size: Sequence[int],
        device: torch.device,
    ) -> WindowLayout:
        """The layout for these arguments (see :func:`build_window_layout`), built on first use."""
        key = (batch, tuple(spatial), tuple(window_size), tuple(shift_size), str(device))
        layout = self._layouts.get(key)
        if layout is None:
            layout = build_window_layout(batch, spatial, window_size, shift_size, device)
            self._layouts[key] = layout
            while len(self._layouts) > LAYOUT_CACHE_SIZE:
                self._layouts.popitem(last=False)
        else:
            self._layouts.move_to_end(key)
        return layout


class FusedBasicLayer(BasicLayer):
    """MONAI's Swin stage (``BasicLayer``, same keys) that never builds MONAI's dense shift mask.

    MONAI recomputes the dense ``(nw, n, n)`` mask on every forward; this stage hands its blocks
    (:class:`FusedSwinTransformerBlock`) a :class:`LayoutCache` instead.
    """

    layouts: LayoutCache

    @classmethod
    def from_monai(cls, layer: BasicLayer) -> FusedBasicLayer:
        """The same stage (sharing its blocks) as a :class:`FusedBasicLayer`."""
        fused = _adopt(cls, layer)
        fused.layouts = LayoutCache()
        return fused

    def forward(self, x: Tensor) -> Tensor:
        """Run the stage on ``x`` ``(B, C, *spatial)``; returns ``(B, C', *spatial')`` as MONAI's does."""
        if torch.jit.is_tracing():  # MONAI's stage (dense mask): a traced network must not hold the fused kernels
            return super().forward(x)
        b, _, *spatial = x.shape
        # a plain tensor inside the stage: a batched MONAI MetaTensor (what the bundles' loaders hand over) cannot
        # be sliced by window groups, and its metadata bookkeeping on every op is pure overhead here
        x = x.as_subclass(Tensor) if type(x) is not Tensor else x
        # channels-last memory once (a no-op for the previous fused stage's output): MONAI's
        # permuted view made every norm, linear and residual add of the stage copy it
        x = x.movedim(1, -1).contiguous()
        for blk in self.blocks:
            x = blk(x, self.layouts)
        x = x.view(b, *spatial, -1)
        if self.downsample is not None:
            x = merge_patches(self.downsample, x)
        return x.movedim(-1, 1)


# MONAI's PatchMerging concatenates the 2x2x2 neighbours in this order of offsets along the three array
# axes (a0, a1, a2) = (R, A, S); PatchMergingV2 in raster order. Index of each block in raster order
# (4·a0 + 2·a1 + a2):
MERGE_ORDER = {PatchMerging: (0, 4, 2, 1, 6, 5, 3, 7), PatchMergingV2: tuple(range(8))}
MERGE_DIMS = 3


def merge_patches(merging: nn.Module, x: Tensor) -> Tensor:
    """MONAI's patch merging of ``x`` ``(B, D, H, W, C)`` with one reshape instead of 8 strided slices.

    MONAI concatenates the 8 neighbours from 8 strided slices, whose backward fills and adds 8
    full-size zero tensors. Here one reshape puts them in raster order, and the LayerNorm and the
    reduction read their (8C)-sized weights permuted to that order instead: the same function.

    Args:
        merging: MONAI's ``PatchMerging`` or ``PatchMergingV2`` (another module is just called).
        x: ``(B, D, H, W, C)``, channels last.

    Returns:
        ``(B, ceil(D/2), ceil(H/2), ceil(W/2), 2C)``.
    """
    order = MERGE_ORDER.get(type(merging))
    if order is None or x.ndim != MERGE_DIMS + 2:
        return merging(x)
    b, d, h, w, c = x.shape
    if d % 2 or h % 2 or w % 2:
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
        b, d, h, w, c = x.shape
    x = (
        x.view(b, d // 2, 2, h // 2, 2, w // 2, 2, c)
        .permute(0, 1, 3, 5, 2, 4, 6, 7)
        .reshape(b, d // 2, h // 2, w // 2, 8 * c)
    )
    # channel j of the raster-ordered vector is channel perm[j] of MONAI's
    blocks = torch.tensor(order, device=x.device).argsort()
    perm = (blocks[:, None] * c + torch.arange(c, device=x.device)).reshape(-1)
    norm = merging.norm
    x = F.layer_norm(x, norm.normalized_shape, norm.weight[perm], norm.bias[perm], norm.eps)
    return F.linear(x, merging.reduction.weight[:, perm], merging.reduction.bias)


class FusedSwinTransformer(SwinTransformer):
    """MONAI's ``SwinTransformer`` (same keys) that passes channels-last maps between its stages.

    MONAI's forward makes every stage's input contiguous in ``(B, C, *spatial)`` order, which the
    next stage then permutes back to channels last; here each stage gets the previous one's
    output as it is. The hidden states are the same values (in channels-last memory).
    """

    @classmethod
    def from_monai(cls, swin: SwinTransformer) -> FusedSwinTransformer:
        """The same module (sharing its parameters) as a :class:`FusedSwinTransformer`."""
        return _adopt(cls, swin)

    def forward(self, x: Tensor, normalize: bool = True) -> list[Tensor]:
        """The patch embedding and the four stage outputs of ``x`` ``(B, C_in, *spatial)``, as MONAI's."""
        if self.use_v2 or torch.jit.is_tracing():
            return super().forward(x, normalize)
        x = self.pos_drop(self.patch_embed(x))
        hidden = [self.proj_out(x, normalize)]
        for stage in (self.layers1, self.layers2, self.layers3, self.layers4):
            x = stage[0](x)
            hidden.append(self.proj_out(x, normalize))
        return hidden


def fuse_window_attention(module: nn.Module) -> int:
    """Swap the fused modules into every MONAI Swin stage under ``module``, in place.

    Each ``BasicLayer`` (but Hyena stages and those with attention dropout) becomes a
    :class:`FusedBasicLayer`, a ``SwinTransformer`` child whose stages all did a
    :class:`FusedSwinTransformer` (``module`` itself keeps its class), its blocks
    :class:`FusedSwinTransformerBlock` and their attention :class:`FusedWindowAttention`.
    Parameters are kept (the same tensors), so state-dict keys and values do not change. While traced
    (``torch.jit.trace``, MONAI's ``ckpt_export --use_trace``) the modules run MONAI's code, which TorchScript
    can record, so an exported network needs neither the fused kernels nor medssl3d.

    Args:
        module: e.g. a MONAI ``SwinUNETR``.

    Returns:
        The number of attention modules swapped (0: nothing to fuse, or already fused).
    """
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is BasicLayer and _fusable(child):
                setattr(parent, name, FusedBasicLayer.from_monai(child))
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is SwinTransformer and not child.use_v2 and _all_stages_fused(child):
                setattr(parent, name, FusedSwinTransformer.from_monai(child))
    for layer in module.modules():
        if not isinstance(layer, FusedBasicLayer):
            continue
        for i, block in enumerate(layer.blocks):
            if type(block) is SwinTransformerBlock:
                block = layer.blocks[i] = FusedSwinTransformerBlock.from_monai(block)
            if type(block.attn) is WindowAttention:
                block.attn = FusedWindowAttention.from_monai(block.attn)
                count += 1
    return count


def _all_stages_fused(swin: SwinTransformer) -> bool:
    return all(
        isinstance(stage[0], FusedBasicLayer) for stage in (swin.layers1, swin.layers2, swin.layers3, swin.layers4)
    )


def _fusable(layer: BasicLayer) -> bool:
    """Swin blocks (not Hyena) without attention dropout, which the fused kernels cannot apply."""
    return not layer.use_hyena and all(
        isinstance(b, SwinTransformerBlock) and b.attn.attn_drop.p == 0 for b in layer.blocks
    )


def _adopt(cls: type, module: nn.Module):
    """A ``cls`` instance with ``module``'s state (parameters, buffers, submodules, hooks), shared."""
    new = cls.__new__(cls)
    new.__dict__.update({k: (v.copy() if isinstance(v, dict) else v) for k, v in module.__dict__.items()})
    return new
