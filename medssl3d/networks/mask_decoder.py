"""AFiRe's restoration decoder: abnormal tokens replaced by learned per-position mask tokens, then a small transformer.

``linear (hidden -> dim)`` -> replace every abnormal token by its position's learned mask token ->
add a fixed 3D sin-cos position embedding -> ``depth`` transformer blocks -> LayerNorm ->
``linear (dim -> C * p^3)`` -> unpatchify to the volume (``docs/methods.md``, section "AFiRe-3D").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange
from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding
from monai.networks.blocks.transformerblock import TransformerBlock
from monai.networks.layers import trunc_normal_
from torch import Tensor, nn

__all__ = ["MaskTokenDecoder", "sincos_embedding_3d"]

DECODER_DIM = 512
DECODER_DEPTH = 4
DECODER_HEADS = 8
MLP_RATIO = 4
PATCH_SIZE = 16
MASK_TOKEN_INIT_STD = 0.02
SINCOS_PARTS = 6
"""A 3D sin-cos embedding uses sin and cos per axis: its width must be a multiple of 6."""


def sincos_embedding_3d(grid_size: Sequence[int], dim: int) -> Tensor:
    """Fixed 3D sin-cos position embedding ``(1, N, dim)`` over a raster grid (last axis fastest).

    MONAI's builder needs a width divisible by 6; the remaining ``dim % 6`` channels are zero.
    """
    usable = dim - dim % SINCOS_PARTS
    pos = build_sincos_position_embedding(list(grid_size), usable, spatial_dims=3).data
    return torch.nn.functional.pad(pos, (0, dim - usable))


class MaskTokenDecoder(nn.Module):
    """Restore a volume from encoder tokens, with abnormal tokens replaced by mask tokens.

    Args:
        in_dim: encoder token width.
        grid_size: token grid along the (D, H, W) axes, ``img_size / patch_size``.
        patch_size: voxels per patch side.
        out_channels: channels of the restored volume.
        dim: decoder width.
        depth: transformer blocks.
        num_heads: attention heads.

    Raises:
        ValueError: ``dim`` not divisible by ``num_heads`` or a non-positive size.
    """

    def __init__(
        self,
        in_dim: int,
        grid_size: Sequence[int],
        patch_size: int = PATCH_SIZE,
        out_channels: int = 1,
        dim: int = DECODER_DIM,
        depth: int = DECODER_DEPTH,
        num_heads: int = DECODER_HEADS,
    ) -> None:
        super().__init__()
        if min(in_dim, patch_size, out_channels, dim, depth, num_heads, *grid_size) < 1:
            raise ValueError(
                f"sizes must be positive: in_dim={in_dim}, grid_size={tuple(grid_size)}, patch_size={patch_size}, "
                f"out_channels={out_channels}, dim={dim}, depth={depth}, num_heads={num_heads}"
            )
        if dim % num_heads:
            raise ValueError(f"decoder dim {dim} must be divisible by num_heads {num_heads}")
        self.grid_size = tuple(int(g) for g in grid_size)
        self.patch_size = patch_size
        self.out_channels = out_channels
        n = self.grid_size[0] * self.grid_size[1] * self.grid_size[2]
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.empty(1, n, dim))
        trunc_normal_(self.mask_token, std=MASK_TOKEN_INIT_STD)
        self.register_buffer("pos_embed", sincos_embedding_3d(self.grid_size, dim), persistent=False)
        self.blocks = nn.ModuleList(
            [TransformerBlock(dim, dim * MLP_RATIO, num_heads, qkv_bias=True) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(dim)
        self.to_voxels = nn.Linear(dim, out_channels * patch_size**3)

    def forward(self, tokens: Tensor, abnormal: Tensor | None = None) -> Tensor:
        """Decode tokens to a volume.

        Args:
            tokens: ``(B, N, in_dim)`` in raster order over the patch grid, last axis fastest.
            abnormal: ``(B, N)`` bool, tokens to replace by mask tokens (None: none).

        Returns:
            ``(B, out_channels, g_0 * p, g_1 * p, g_2 * p)`` with ``(g_0, g_1, g_2) = grid_size``.
        """
        x = self.embed(tokens)
        if abnormal is not None:
            x = torch.where(abnormal[..., None].to(x.device), self.mask_token.to(x.dtype), x)
        x = x + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            x = block(x)
        x = self.to_voxels(self.norm(x))
        g0, g1, g2 = self.grid_size
        p = self.patch_size
        return rearrange(
            x,
            "b (g0 g1 g2) (c p0 p1 p2) -> b c (g0 p0) (g1 p1) (g2 p2)",
            g0=g0,
            g1=g1,
            g2=g2,
            c=self.out_channels,
            p0=p,
            p1=p,
            p2=p,
        )
