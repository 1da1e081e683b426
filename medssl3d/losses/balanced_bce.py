"""α-balanced binary cross-entropy with soft targets, on logits."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DEFAULT_ALPHA", "BalancedBCEWithLogitsLoss"]

DEFAULT_ALPHA = 0.9
REDUCTIONS = ("mean", "sum", "none")


class BalancedBCEWithLogitsLoss(nn.Module):
    """``−[α · y · log σ(x) + (1 − α) · (1 − y) · log(1 − σ(x))]`` element-wise, then reduced.

    The α-balancing of focal loss (Lin et al., ICCV 2017) without the focusing term, with soft targets
    ``y ∈ [0, 1]``: with few positives among many negatives (one Gaussian bump per row of a similarity
    matrix, as in ACE-3D's dense losses) ``α`` near 1 keeps the positives from being drowned. ``α = 0.5``
    is half of the ordinary binary cross-entropy. ``log σ`` is computed as ``logsigmoid`` so large
    logits stay finite.

    Args:
        alpha: weight of the positive term, in [0, 1].
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
            A scalar ("mean", "sum") or the element-wise loss ("none").

        Raises:
            ValueError: shapes differ.
        """
        if logits.shape != targets.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ in shape")
        targets = targets.to(logits.dtype)
        # log(1 - σ(x)) = logsigmoid(-x)
        loss = -(
            self.alpha * targets * F.logsigmoid(logits) + (1.0 - self.alpha) * (1.0 - targets) * F.logsigmoid(-logits)
        )
        if self.reduction == "mean":
            return loss.mean()
        if self.reduction == "sum":
            return loss.sum()
        return loss
