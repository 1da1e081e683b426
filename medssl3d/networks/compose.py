"""ACE-3D's dense projection head and its composition / decomposition of dense-feature maps.

See ``docs/methods.md`` (section "ACE-3D"). Two grid-aligned crops share one cell lattice: each token of the
×2-downsampled large crop covers the 2×2×2 cells that 2×2×2 tokens of the small crop cover. *Composition*
maps every 2×2×2 block of small-crop features to one feature (the large token at that place);
*decomposition* maps one large-crop feature to 2×2×2 features (the small tokens under it). As in the
official code, both act on the output of the :class:`DenseHead`.

Layout convention, shared by :func:`unfold_2x2x2` and :func:`pixel_shuffle_3d` (they are inverses): the
8 members of a block are concatenated along channels in raster order of their offsets ``(o0, o1, o2)``
along the last three tensor axes (R, A, S after ``Orientationd("RAS")``: left→right, posterior→anterior,
inferior→superior), so channel ``((o0 * 2 + o1) * 2 + o2) * C + c`` of block ``(u0, u1, u2)`` is channel
``c`` of token ``(2 u0 + o0, 2 u1 + o1, 2 u2 + o2)``.
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
        ``(B, 8 C, D / 2, H / 2, W / 2)`` in the module's ``(o0, o1, o2, c)`` channel order.

    Raises:
        ValueError: a spatial side is odd.
    """
    if x.ndim != 5 or any(s % BLOCK for s in x.shape[2:]):
        raise ValueError(f"unfold_2x2x2 needs (B, C, D, H, W) with even sides, got {tuple(x.shape)}")
    return rearrange(x, "b c (d p) (h q) (w r) -> b (p q r c) d h w", p=BLOCK, q=BLOCK, r=BLOCK)


def pixel_shuffle_3d(x: Tensor) -> Tensor:
    """3D pixel shuffle (depth-to-space), the inverse of :func:`unfold_2x2x2`.

    Args:
        x: ``(B, 8 C, D, H, W)`` in the module's ``(o0, o1, o2, c)`` channel order.

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
    """Compose 2×2×2 features into one: unfold, ``Linear(8D → D, no bias) → LayerNorm → ReLU → Linear(D → D)``.

    Args:
        dim: feature channels ``D`` (the dense head's output width).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(SUB_TOKENS * dim, dim, bias=False), nn.LayerNorm(dim), nn.ReLU(inplace=True), nn.Linear(dim, dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        """Compose a feature map.

        Args:
            x: ``(B, D, n, n, n)`` small-crop dense features (any even sides).

        Returns:
            ``(B, D, n / 2, n / 2, n / 2)``: feature ``j`` is composed from features ``2 j + {0, 1}`` per axis.
        """
        return _channels_first(self.mlp(_channels_last(unfold_2x2x2(x))))


class Decomposition(nn.Module):
    """Decompose a feature into 2×2×2: ``Linear(D → 8D, no bias) → LayerNorm → ReLU → Linear(8D → 8D)``, shuffle.

    Args:
        dim: feature channels ``D`` (the dense head's output width).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        wide = SUB_TOKENS * dim
        self.mlp = nn.Sequential(
            nn.Linear(dim, wide, bias=False), nn.LayerNorm(wide), nn.ReLU(inplace=True), nn.Linear(wide, wide)
        )

    def forward(self, x: Tensor) -> Tensor:
        """Decompose a feature map.

        Args:
            x: ``(B, D, n, n, n)`` large-crop dense features.

        Returns:
            ``(B, D, 2n, 2n, 2n)``: feature ``k`` comes from feature ``k // 2`` per axis, sub-cell ``k % 2``.
        """
        return pixel_shuffle_3d(_channels_first(self.mlp(_channels_last(x))))


class DenseHead(nn.Module):
    """Per-token projection: ``n_layers`` × (1×1×1 conv → BatchNorm → ReLU), then L2 normalisation.

    The official ACE dense head. It runs on the backbone tokens of both the student and the EMA teacher
    (the student's composition and decomposition then act on its output), so the teacher's copy sees
    inputs of the kind its student was trained on. Its output is non-negative (the last ReLU) and of unit
    norm. A 1×1×1 convolution is a linear layer applied to every token and is computed as one
    (``nn.Linear`` on ``(B·N, C)`` rows, without bias since BatchNorm follows, and ``BatchNorm1d``):
    PyTorch's CPU Conv3d has no fast path for 1×1×1 kernels.

    BatchNorm normalises with the statistics of the tokens of the current call, in training *and* eval
    mode (``track_running_stats=False``). The official teacher runs in training mode, so its BatchNorm
    uses its own batch statistics; here the EMA teacher is kept in eval mode, and running statistics
    would be the student's, carried over by the EMA. The head is never exported, so there is no
    inference use for running statistics.

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
        for d_in, d_out in zip(dims[:-1], dims[1:], strict=True):
            layers += [
                nn.Linear(d_in, d_out, bias=False),
                nn.BatchNorm1d(d_out, track_running_stats=False),
                nn.ReLU(inplace=True),
            ]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Project a token map.

        Args:
            x: ``(B, in_dim, D, H, W)``; BatchNorm statistics run over all ``B·D·H·W`` tokens.

        Returns:
            ``(B, out_dim, D, H, W)``, every token of unit norm along channels.
        """
        tokens = _channels_last(x)
        y = self.net(tokens.reshape(-1, tokens.shape[-1])).view(*tokens.shape[:-1], -1)
        return F.normalize(_channels_first(y), dim=1, eps=L2_EPS)
