"""ACE-3D's composition and decomposition of token maps, and its dense projection head (methods.md §4).

Two grid-aligned crops share one cell lattice: each token of the ×2-downsampled large crop covers the
2×2×2 cells that 2×2×2 tokens of the small crop cover. *Composition* maps every 2×2×2 block of small
tokens to one feature (the large token at that place); *decomposition* maps one large token to 2×2×2
features (the small tokens under it).

Layout convention, shared by :func:`unfold_2x2x2` and :func:`pixel_shuffle_3d` (they are inverses):
the 8 members of a block are concatenated along channels in ``(dz, dy, dx)`` raster order, so channel
``((dz * 2 + dy) * 2 + dx) * C + c`` of block ``(z, y, x)`` is channel ``c`` of token
``(2z + dz, 2y + dy, 2x + dx)``.
"""

from __future__ import annotations

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

__all__ = ["BLOCK", "Composition", "Decomposition", "DenseHead", "pixel_shuffle_3d", "unfold_2x2x2"]

BLOCK = 2
"""Side of the token block one large token covers (the scale ratio of the two crops)."""
SUB_TOKENS = BLOCK**3
DENSE_HIDDEN_DIM = 2048
DENSE_OUT_DIM = 256
DENSE_N_LAYERS = 3
L2_EPS = 1e-6
"""Guards the L2 normalisation of dense features against all-zero vectors."""


def unfold_2x2x2(x: Tensor) -> Tensor:
    """Concatenate every 2×2×2 block of tokens along channels (space-to-depth).

    Args:
        x: token map ``(B, C, D, H, W)`` with D, H, W even.

    Returns:
        ``(B, 8 C, D / 2, H / 2, W / 2)`` in the module's ``(dz, dy, dx, c)`` channel order.

    Raises:
        ValueError: a spatial side is odd.
    """
    if x.ndim != 5 or any(s % BLOCK for s in x.shape[2:]):
        raise ValueError(f"unfold_2x2x2 needs (B, C, D, H, W) with even sides, got {tuple(x.shape)}")
    return rearrange(x, "b c (d p) (h q) (w r) -> b (p q r c) d h w", p=BLOCK, q=BLOCK, r=BLOCK)


def pixel_shuffle_3d(x: Tensor) -> Tensor:
    """3D pixel shuffle (depth-to-space), the inverse of :func:`unfold_2x2x2`.

    Args:
        x: ``(B, 8 C, D, H, W)`` in the module's ``(dz, dy, dx, c)`` channel order.

    Returns:
        ``(B, C, 2 D, 2 H, 2 W)``.

    Raises:
        ValueError: the channel count is not a multiple of 8.
    """
    if x.ndim != 5 or x.shape[1] % SUB_TOKENS:
        raise ValueError(f"pixel_shuffle_3d needs (B, 8C, D, H, W), got {tuple(x.shape)}")
    return rearrange(x, "b (p q r c) d h w -> b c (d p) (h q) (w r)", p=BLOCK, q=BLOCK, r=BLOCK)


def _channels_last(x: Tensor) -> Tensor:
    return x.permute(0, 2, 3, 4, 1)


def _channels_first(x: Tensor) -> Tensor:
    return x.permute(0, 4, 1, 2, 3)


class Composition(nn.Module):
    """Compose 2×2×2 tokens into one: unfold, ``Linear(8D → D, no bias) → LayerNorm → ReLU → Linear(D → D)``.

    Args:
        dim: token channels ``D``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(SUB_TOKENS * dim, dim, bias=False), nn.LayerNorm(dim), nn.ReLU(inplace=True), nn.Linear(dim, dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        """Compose a token map.

        Args:
            x: ``(B, D, n, n, n)`` small-crop tokens (any even sides).

        Returns:
            ``(B, D, n / 2, n / 2, n / 2)``: feature ``j`` is composed from tokens ``2 j + {0, 1}`` per axis.
        """
        return _channels_first(self.mlp(_channels_last(unfold_2x2x2(x))))


class Decomposition(nn.Module):
    """Decompose a token into 2×2×2: ``Linear(D → 8D, no bias) → LayerNorm → ReLU → Linear(8D → 8D)``, shuffle.

    Args:
        dim: token channels ``D``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        wide = SUB_TOKENS * dim
        self.mlp = nn.Sequential(
            nn.Linear(dim, wide, bias=False), nn.LayerNorm(wide), nn.ReLU(inplace=True), nn.Linear(wide, wide)
        )

    def forward(self, x: Tensor) -> Tensor:
        """Decompose a token map.

        Args:
            x: ``(B, D, n, n, n)`` large-crop tokens.

        Returns:
            ``(B, D, 2n, 2n, 2n)``: feature ``k`` comes from token ``k // 2`` per axis, sub-cell ``k % 2``.
        """
        return pixel_shuffle_3d(_channels_first(self.mlp(_channels_last(x))))


class DenseHead(nn.Module):
    """Per-token projection: 1×1×1 convolutions with BatchNorm and ReLU between them, then L2 normalisation.

    ``n_layers`` 1×1×1 convolutions; every one but the last is followed by BatchNorm and ReLU. The last has
    neither: a ReLU before the L2 normalisation would make every cosine similarity non-negative, so the
    dense BCE could never push a negative pair below a logit of 0 (methods.md §4 lists "three 1×1×1 conv
    → BatchNorm → ReLU"; this is the reading of it as an MLP projector). A 1×1×1 convolution is a linear
    layer applied to every token, and is computed as one (``nn.Linear`` on ``(B·N, C)`` rows with
    ``BatchNorm1d``): PyTorch's CPU Conv3d has no fast path for 1×1×1 kernels.

    BatchNorm uses batch statistics in training *and* eval mode (``track_running_stats=False``): the
    EMA teacher (kept in eval mode) then normalises its own features instead of using running statistics
    of the student's composed/decomposed features, as in DINO where the teacher's BatchNorm sees its batch.

    Args:
        in_dim: token channels.
        hidden_dim: width of the hidden layers.
        out_dim: width of the normalised output.
        n_layers: number of 1×1×1 convolutions (>= 1).

    Raises:
        ValueError: ``n_layers < 1``.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = DENSE_HIDDEN_DIM,
        out_dim: int = DENSE_OUT_DIM,
        n_layers: int = DENSE_N_LAYERS,
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"DenseHead n_layers must be >= 1, got {n_layers}")
        dims = [in_dim] + [hidden_dim] * (n_layers - 1) + [out_dim]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            last = i == n_layers - 1
            # the bias is redundant before BatchNorm
            layers.append(nn.Linear(d_in, d_out, bias=last))
            if not last:
                layers.append(nn.BatchNorm1d(d_out, track_running_stats=False))
                layers.append(nn.ReLU(inplace=True))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Project a token map.

        Args:
            x: ``(B, in_dim, D, H, W)``; BatchNorm statistics run over all ``B·D·H·W`` tokens.

        Returns:
            ``(B, D·H·W, out_dim)`` unit-norm tokens in ``(z, y, x)`` raster order.
        """
        tokens = x.flatten(2).transpose(1, 2)  # (B, N, C)
        y = self.net(tokens.reshape(-1, tokens.shape[-1])).view(*tokens.shape[:2], -1)
        return F.normalize(y, dim=-1, eps=L2_EPS)
