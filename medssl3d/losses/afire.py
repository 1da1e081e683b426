"""AFiRe's loss terms: categorical and structural consistency on normal tokens, restoration.

See ``docs/methods.md`` (section "AFiRe-3D").

The two consistency terms average over *normal* tokens only (those whose patch holds no synthetic
lesion): a lesioned token's features carry no weight and receive no gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CategoricalLoss", "RestorationLoss", "StructuralLoss", "masked_token_mean"]

STUDENT_TEMPERATURE = 0.1
STRUCTURAL_TEMPERATURE = 0.1


def masked_token_mean(values: Tensor, normal: Tensor) -> Tensor:
    """Mean of ``values`` (B, N) over entries where ``normal`` (B, N) is True; 0 when none is.

    ``torch.where`` (not a product) keeps non-finite values at excluded tokens out of the result
    and out of the gradient.
    """
    normal = normal.to(device=values.device, dtype=torch.bool)
    total = torch.where(normal, values, torch.zeros_like(values)).sum()
    return total / normal.sum().clamp_min(1)


class CategoricalLoss(nn.Module):
    """``mean over normal (b, j) of -sum_k T[j, k] log softmax(s[b, j] / tau)_k``.

    Args:
        temperature: student temperature ``tau``.
    """

    def __init__(self, temperature: float = STUDENT_TEMPERATURE) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, student_scores: Tensor, targets: Tensor, normal: Tensor) -> Tensor:
        """Compute the term.

        Args:
            student_scores: ``(B, N, K)`` student cosine scores.
            targets: ``(N, K)`` per-position target distributions (Sinkhorn-Knopp of the prototypes).
            normal: ``(B, N)`` bool, tokens that count.

        Returns:
            Scalar.
        """
        log_p = F.log_softmax(student_scores.float() / self.temperature, dim=-1)
        per_token = -(targets.to(log_p)[None] * log_p).sum(dim=-1)
        return masked_token_mean(per_token, normal)


class StructuralLoss(nn.Module):
    """InfoNCE over positions: ``mean over normal (b, j) of -log softmax_j'(<q[b, j], c[j']> / tau)[j]``.

    Args:
        temperature: ``tau``.
    """

    def __init__(self, temperature: float = STRUCTURAL_TEMPERATURE) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, q: Tensor, centres: Tensor, normal: Tensor) -> Tensor:
        """Compute the term.

        Args:
            q: ``(B, N, d)`` student features, L2-normalised.
            centres: ``(N, d)`` per-position centres (EMA of the mean teacher features), L2-normalised.
            normal: ``(B, N)`` bool, tokens that count (as anchors; every position is a candidate).

        Returns:
            Scalar.
        """
        logits = torch.einsum("bnd,md->bnm", q.float(), centres.float()) / self.temperature
        log_p = F.log_softmax(logits, dim=-1)
        per_token = -torch.diagonal(log_p, dim1=1, dim2=2)
        return masked_token_mean(per_token, normal)


class RestorationLoss(nn.Module):
    """Mean squared error to the clean volume, optionally up-weighting lesion voxels.

    With ``lesion_weight = w`` a voxel with ``m > 0`` counts ``w`` times; the result is the
    weighted mean (``w = 1``: plain MSE over all voxels).

    Args:
        lesion_weight: weight of lesion voxels (>= 0).
    """

    def __init__(self, lesion_weight: float = 1.0) -> None:
        super().__init__()
        if lesion_weight < 0:
            raise ValueError(f"lesion_weight must be >= 0, got {lesion_weight}")
        self.lesion_weight = lesion_weight

    def forward(self, pred: Tensor, target: Tensor, lesion_map: Tensor | None = None) -> Tensor:
        """Compute the loss.

        Args:
            pred: ``(B, C, D, H, W)`` restored volume.
            target: ``(B, C, D, H, W)`` clean volume.
            lesion_map: ``(B, C, D, H, W)`` additive lesion map ``m`` (needed when ``lesion_weight != 1``).

        Returns:
            Scalar.
        """
        err = (pred.float() - target.float()) ** 2
        if self.lesion_weight == 1.0 or lesion_map is None:
            return err.mean()
        weight = torch.where(lesion_map > 0, self.lesion_weight, 1.0).to(err)
        return (weight * err).sum() / weight.sum().clamp_min(torch.finfo(err.dtype).tiny)
