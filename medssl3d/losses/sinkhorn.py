"""Sinkhorn-Knopp balancing of a score matrix into a transport plan (SwAV; AFiRe's categorical targets)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["sinkhorn_knopp"]

DEFAULT_EPSILON = 0.05
DEFAULT_ITERATIONS = 3


@torch.no_grad()
def sinkhorn_knopp(scores: Tensor, epsilon: float = DEFAULT_EPSILON, iterations: int = DEFAULT_ITERATIONS) -> Tensor:
    """Balance ``exp(scores / epsilon)`` so that rows sum to 1 and columns share the mass equally.

    Each iteration scales the columns to sum ``N / K`` and then the rows to sum 1, so the rows are
    exact after any number of iterations and the columns converge. The scaling is done on
    logarithms (``logsumexp``), so scores of ``1 / epsilon`` = 20 and more cannot overflow.

    Args:
        scores: ``(N, K)`` (rows: AFiRe's token positions; columns: prototypes).
        epsilon: entropic temperature (smaller: sharper targets).
        iterations: column-then-row scalings.

    Returns:
        ``(N, K)`` non-negative plan with rows summing to 1 and columns to about ``N / K``.

    Raises:
        ValueError: ``scores`` is not 2D, ``epsilon <= 0`` or ``iterations < 1``.
    """
    if scores.ndim != 2:
        raise ValueError(f"sinkhorn_knopp expects (N, K) scores, got shape {tuple(scores.shape)}")
    if epsilon <= 0 or iterations < 1:
        raise ValueError(f"need epsilon > 0 and iterations >= 1, got epsilon={epsilon}, iterations={iterations}")
    n, k = scores.shape
    log_q = scores.float() / epsilon
    log_col = torch.log(torch.tensor(n / k, device=scores.device))
    for _ in range(iterations):
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) + log_col
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True)
    return log_q.exp()
