"""α-balanced binary cross-entropy with soft targets, on logits (the dense losses of ACE-3D)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DEFAULT_ALPHA", "BalancedBCEWithLogitsLoss"]

DEFAULT_ALPHA = 0.9
REDUCTIONS = ("mean", "sum", "none")


class BalancedBCEWithLogitsLoss(nn.Module):
    """``α_t · BCE(x, t)`` element-wise with ``α_t = α·t + (1 − α)·(1 − t)``, then reduced.

    The α-balancing of focal loss (Lin et al., ICCV 2017) without its focusing term: torchvision's
    ``sigmoid_focal_loss`` with ``γ = 0``, which ACE's official code calls on Gaussian (soft) targets
    ``t ∈ [0, 1]``. ``BCE(x, t) = −[t·log σ(x) + (1 − t)·log(1 − σ(x))]`` is PyTorch's
    ``binary_cross_entropy_with_logits`` (finite for large logits). ``α_t`` only reweights an element,
    so for any soft target the per-element optimum stays ``σ(x) = t``; with few positives among many
    negatives (one Gaussian bump per row of a similarity matrix) ``α`` near 1 keeps the positives from
    being drowned. For hard targets this equals ``−[α·t·log σ(x) + (1 − α)(1 − t)·log(1 − σ(x))]``;
    ``α = 0.5`` is half of the ordinary binary cross-entropy.

    Args:
        alpha: weight of the positive part of a target, in [0, 1].
        reduction: "mean" (over all elements), "sum" or "none".

    Raises:
        ValueError: ``alpha`` outside [0, 1] or an unknown reduction.
    """

    def __init__(self, alpha: float = DEFAULT_ALPHA, reduction: str = "mean") -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.alpha = alpha
        self.reduction = reduction

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Compute the loss.

        Args:
            logits: any shape, e.g. ``(B, R, M)`` similarity logits.
            targets: soft targets in [0, 1], the shape of ``logits``.

        Returns:
            A float32 scalar ("mean", "sum") or the element-wise loss ("none").

        Raises:
            ValueError: shapes differ.
        """
        if logits.shape != targets.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ in shape")
        # in float32 whatever the logits' dtype: bf16 would round the soft targets to 3 significant digits
        logits, targets = logits.float(), targets.float()
        alpha_t = self.alpha * targets + (1.0 - self.alpha) * (1.0 - targets)
        loss = alpha_t * F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        if self.reduction == "mean":
            return loss.mean()
        if self.reduction == "sum":
            return loss.sum()
        return loss
