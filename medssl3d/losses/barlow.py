"""Barlow Twins' redundancy-reduction loss (Zbontar et al., ICML 2021)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["DEFAULT_LAMBDA", "BarlowTwinsLoss"]

DEFAULT_LAMBDA = 5e-3  # weight of the off-diagonal terms (docs/methods.md, section "DiRA-3D"; the paper's value)
DEFAULT_EPS = 1e-5  # BatchNorm1d's eps, as the original normalises with a parameter-free BatchNorm
MIN_BATCH = 2  # the per-feature standardisation over the batch needs two samples


def _gather_with_grad(x: Tensor) -> Tensor:
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


class BarlowTwinsLoss(nn.Module):
    """``sum_i (1 − C_ii)² + λ sum_{i≠j} C_ij²`` with ``C`` the cross-correlation of two embeddings.

    Each embedding is standardised per feature over the batch (mean 0, biased variance 1, as a
    BatchNorm without affine), then ``C = z1ᵀ z2 / N``. With ``gather_distributed`` and an
    initialised process group of several ranks, the embeddings of every rank are gathered (with
    gradients) first, so ``N`` is the global batch, as the original's all-reduced ``C``. Without
    it the loss needs no ``torch.distributed``.

    Args:
        lambda_offdiag: weight λ of the off-diagonal terms.
        eps: added to the variance before the standardisation.
        gather_distributed: standardise and correlate over every rank's batch under DDP.
    """

    def __init__(self, lambda_offdiag: float = DEFAULT_LAMBDA, eps: float = DEFAULT_EPS,
                 gather_distributed: bool = True) -> None:
        super().__init__()
        if lambda_offdiag < 0:
            raise ValueError(f"lambda_offdiag must be >= 0, got {lambda_offdiag}")
        self.lambda_offdiag = lambda_offdiag
        self.eps = eps
        self.gather_distributed = gather_distributed

    def _distributed(self) -> bool:
        return (self.gather_distributed and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1)

    def _standardise(self, z: Tensor) -> Tensor:
        mean = z.mean(dim=0, keepdim=True)
        var = z.var(dim=0, unbiased=False, keepdim=True)
        return (z - mean) / torch.sqrt(var + self.eps)

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        """Compute the loss.

        Args:
            z1: embeddings of the first views (B, C); row i pairs with row i of ``z2``.
            z2: embeddings of the second views (B, C).

        Returns:
            The scalar loss.

        Raises:
            ValueError: shapes differ or are not (B, C), or the (global) batch has fewer than 2 samples.
        """
        if z1.ndim != 2 or z1.shape != z2.shape:
            raise ValueError(f"z1 and z2 must both be (B, C), got {tuple(z1.shape)} and {tuple(z2.shape)}")
        if self._distributed():
            z1, z2 = _gather_with_grad(z1), _gather_with_grad(z2)
        n = z1.shape[0]
        if n < MIN_BATCH:
            raise ValueError(
                f"Barlow Twins needs a batch of at least {MIN_BATCH} samples to standardise over, got {n} "
                "(raise the batch size, or run several processes with gather_distributed)"
            )
        c = self._standardise(z1).T @ self._standardise(z2) / n
        on_diag = (torch.diagonal(c) - 1).pow(2).sum()
        off_diag = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
        return on_diag + self.lambda_offdiag * off_diag
