"""AFiRe's spatial-aware head: a shared MLP, then one weight-normalised prototype layer per token position.

Tokens of aligned scans at position ``j`` show the same anatomy, so each position gets its own
``K`` prototypes (``docs/methods.md``, section "AFiRe-3D"). The ``N`` per-position layers are one
parameter ``(N, K, d)`` applied as a single batched einsum over positions; their rows are
L2-normalised in the forward pass (weight normalisation with the norm fixed at 1), so the outputs
are cosine scores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.layers import trunc_normal_
from torch import Tensor, nn

from medssl3d.networks.heads import DINO_INIT_STD, L2_EPS, dino_mlp

__all__ = ["SpatialAwareHead"]

HIDDEN_DIM = 1024
BOTTLENECK_DIM = 256
NUM_PROTOTYPES = 256
N_LAYERS = 3


class SpatialAwareHead(nn.Module):
    """MLP ``in -> hidden -> ... -> bottleneck`` (GELU), L2 normalisation, per-position prototype layers.

    Args:
        in_dim: token channels ``C``.
        num_positions: token positions ``N`` (fixed by the aligned grid).
        num_prototypes: prototypes per position ``K``.
        hidden_dim: width of the hidden layers.
        bottleneck_dim: width ``d`` of the normalised feature.
        n_layers: linear layers of the MLP (at least 1).

    Raises:
        ValueError: for ``n_layers < 1`` or a non-positive size.
    """

    def __init__(
        self,
        in_dim: int,
        num_positions: int,
        num_prototypes: int = NUM_PROTOTYPES,
        hidden_dim: int = HIDDEN_DIM,
        bottleneck_dim: int = BOTTLENECK_DIM,
        n_layers: int = N_LAYERS,
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"SpatialAwareHead n_layers must be >= 1, got {n_layers}")
        if min(in_dim, num_positions, num_prototypes, hidden_dim, bottleneck_dim) < 1:
            raise ValueError(
                f"sizes must be positive, got in_dim={in_dim}, num_positions={num_positions}, "
                f"num_prototypes={num_prototypes}, hidden_dim={hidden_dim}, bottleneck_dim={bottleneck_dim}"
            )
        self.mlp = dino_mlp(in_dim, hidden_dim, bottleneck_dim, n_layers)
        self.num_positions = num_positions
        # weight[j] is position j's (K, d) prototype layer; its rows are normalised in forward.
        self.weight = nn.Parameter(torch.empty(num_positions, num_prototypes, bottleneck_dim))
        trunc_normal_(self.weight, std=DINO_INIT_STD)

    def prototypes(self) -> Tensor:
        """Effective per-position prototypes ``(N, K, d)`` with unit-norm rows."""
        return F.normalize(self.weight, dim=-1)

    def embed(self, tokens: Tensor) -> Tensor:
        """The L2-normalised bottleneck feature ``(B, N, d)`` of tokens ``(B, N, C)``."""
        return F.normalize(self.mlp(tokens), dim=-1, eps=L2_EPS)

    def score(self, z: Tensor) -> Tensor:
        """Cosine scores ``(B, N, K)`` of normalised features ``z`` ``(B, N, d)`` against each position's prototypes."""
        return torch.einsum("bnd,nkd->bnk", z, self.prototypes())

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Map tokens to per-position prototype scores.

        Args:
            tokens: ``(B, N, C)`` with ``N == num_positions`` in raster order over the patch grid, last axis fastest.

        Returns:
            ``(scores (B, N, K), z (B, N, d))``: cosine scores and the normalised bottleneck feature.

        Raises:
            ValueError: the token count differs from ``num_positions``.
        """
        if tokens.ndim != 3 or tokens.shape[1] != self.num_positions:
            raise ValueError(
                f"SpatialAwareHead expects (B, {self.num_positions}, C) tokens, got shape {tuple(tokens.shape)}"
            )
        z = self.embed(tokens)
        return self.score(z), z
