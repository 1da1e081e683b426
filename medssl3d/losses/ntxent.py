"""NT-Xent: the normalised temperature-scaled cross-entropy of SimCLR for two views."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DEFAULT_TEMPERATURE", "NTXentLoss"]

DEFAULT_TEMPERATURE = 0.5  # Swin UNETR self-supervised pretraining (Tang et al., CVPR 2022)


def _gather_with_grad(x: Tensor) -> tuple[Tensor, int]:
    """All ranks' ``x`` concatenated (gradients flow back to every rank) and this rank's index."""
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0), dist.get_rank()


class NTXentLoss(nn.Module):
    """NT-Xent loss between two batches of paired embeddings (Chen et al., SimCLR, 2020).

    The ``2B`` embeddings are L2-normalised; for each one the positive is its partner view and
    every other embedding except itself is a negative:

    ``l_i = -log( exp(s(i, p(i)) / t) / sum_{k != i} exp(s(i, k) / t) )``, averaged over all ``2B``,

    where ``s`` is the cosine similarity. This equals the ``Contrast`` loss of the Swin UNETR
    pretraining code. With ``gather_distributed`` and an initialised process group of more than one
    rank, the negatives come from every rank (gradients flow through the gather); otherwise the loss
    is purely local and needs no ``torch.distributed``. A batch of one pair has no negatives and a
    loss of exactly 0.

    Args:
        temperature: softmax temperature ``t`` (> 0).
        gather_distributed: use the embeddings of all ranks as negatives.

    Raises:
        ValueError: a non-positive temperature.
    """

    def __init__(self, temperature: float = DEFAULT_TEMPERATURE, gather_distributed: bool = False) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.gather_distributed = gather_distributed

    def _distributed(self) -> bool:
        if not self.gather_distributed:
            return False
        import torch.distributed as dist

        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        """Compute the loss.

        Args:
            z1: embeddings of the first views, (B, C); row i pairs with row i of ``z2``.
            z2: embeddings of the second views, (B, C).

        Returns:
            The scalar loss.

        Raises:
            ValueError: ``z1`` and ``z2`` not of one shape (B, C).
        """
        if z1.ndim != 2 or z1.shape != z2.shape:
            raise ValueError(f"z1 and z2 must both be (B, C), got {tuple(z1.shape)} and {tuple(z2.shape)}")
        batch = z1.shape[0]
        z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
        if self._distributed():
            all1, rank = _gather_with_grad(z1)
            all2, _ = _gather_with_grad(z2)
        else:
            all1, all2, rank = z1, z2, 0
        # Row r of either view pairs with global column rank * B + r of the other view's block.
        idx = torch.arange(batch, device=z1.device) + rank * batch
        self_mask = F.one_hot(idx, all1.shape[0]).bool()
        fill = torch.finfo(z1.dtype).min
        logits_1 = torch.cat([z1 @ all2.T, (z1 @ all1.T).masked_fill(self_mask, fill)], dim=1)
        logits_2 = torch.cat([z2 @ all1.T, (z2 @ all2.T).masked_fill(self_mask, fill)], dim=1)
        logits = torch.cat([logits_1, logits_2], dim=0) / self.temperature
        return F.cross_entropy(logits, idx.repeat(2))
