"""CASA: conditional anatomical feature alignment, one cross-attention block (``docs/methods.md``, section "Alice").

Jiang et al., "Anatomical Invariance Modeling and Semantic Alignment for Self-supervised Learning
in 3D Medical Image Analysis" (Alice), ICCV 2023. Query tokens attend to a context token set
(scaled dot-product attention, 8 heads, dropout 0.1), then residual + LayerNorm, a feed-forward
512 -> 2048 -> 512, residual + LayerNorm (post-norm, as the transformer decoder layer it follows).

Block internals that differ from the official ``CASA_Module``: ``nn.MultiheadAttention`` has biases
on its q/k/v/output projections (the official ones have none), the feed-forward uses GELU (official:
ReLU) with dropout after its first linear layer (official: after the second), and LayerNorm uses
eps 1e-5 (official: 1e-6). None changes what the block can express.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["CASA"]

DEFAULT_DIM = 512
DEFAULT_HEADS = 8
DEFAULT_FFN_DIM = 2048
DEFAULT_DROPOUT = 0.1


class CASA(nn.Module):
    """Cross-attention block ``(query (B, Nq, C), context (B, Nk, C)) -> (B, Nq, C)``.

    Args:
        dim: token width ``C``.
        num_heads: attention heads (``dim`` must be divisible by it).
        ffn_dim: hidden width of the feed-forward network.
        dropout: dropout of the attention weights and after the attention / feed-forward outputs.

    Raises:
        ValueError: ``dim`` not divisible by ``num_heads``, or a dropout outside [0, 1).
    """

    def __init__(
        self,
        dim: int = DEFAULT_DIM,
        num_heads: int = DEFAULT_HEADS,
        ffn_dim: int = DEFAULT_FFN_DIM,
        dropout: float = DEFAULT_DROPOUT,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.drop1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim)
        )
        self.drop2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, query: Tensor, context: Tensor) -> Tensor:
        """Align ``query`` tokens with ``context`` tokens.

        Args:
            query: ``(B, Nq, C)``.
            context: keys and values ``(B, Nk, C)``.

        Returns:
            ``(B, Nq, C)``.

        Raises:
            ValueError: the batch sizes or widths differ.
        """
        if query.ndim != 3 or context.ndim != 3 or query.shape[::2] != context.shape[::2]:
            raise ValueError(
                f"CASA expects (B, Nq, C) and (B, Nk, C), got {tuple(query.shape)} and {tuple(context.shape)}"
            )
        attended, _ = self.attn(query, context, context, need_weights=False)
        x = self.norm1(query + self.drop1(attended))
        return self.norm2(x + self.drop2(self.ffn(x)))
