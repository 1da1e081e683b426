"""MoCo's InfoNCE against a queue of momentum-encoder keys (He et al., CVPR 2020; MoCo v2)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DEFAULT_QUEUE_SIZE", "DEFAULT_TEMPERATURE", "EMPTY_ID", "MoCoLoss"]

DEFAULT_QUEUE_SIZE = 4096  # docs/methods.md (section "DiRA-3D"); configurable up to MoCo's 65536
DEFAULT_TEMPERATURE = 0.2  # MoCo v2
EMPTY_ID = -1  # volume id of the queue's initial random keys (no volume)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def _gather(x: Tensor) -> Tensor:
    """All ranks' ``x`` concatenated in rank order (keys and ids carry no gradient)."""
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


class MoCoLoss(nn.Module):
    """InfoNCE of queries against their keys (positives) and a queue of past keys (negatives).

    ``l_i = -log( exp(q_i·k_i / t) / (exp(q_i·k_i / t) + sum_j exp(q_i·n_j / t)) )``, averaged over
    the batch, with ``q``, ``k`` and the queue entries ``n_j`` L2-normalised. The queue is a
    registered buffer ``(queue_size, dim)`` with a write pointer ``queue_ptr`` (a 0-d long buffer),
    so both are saved in checkpoints and broadcast like any buffer; it starts as random unit
    vectors, as in MoCo. :meth:`enqueue` overwrites the oldest entries (first in, first out);
    with ``gather_distributed`` and an initialised process group of several ranks, it first
    gathers the keys of every rank (rank order), so every rank's queue stays identical. The loss
    itself needs no ``torch.distributed``.

    Volume ids (optional): beside each queued key the buffer ``queue_ids`` (queue_size,) holds the
    id of the volume it came from (:data:`EMPTY_ID` for the initial random keys). When
    :meth:`forward` gets the queries' ids, every queued key of the query's own volume is masked
    out of the negatives (its logit set to −inf, so it adds nothing to the denominator): on a
    small dataset the queue spans many epochs and would otherwise hold a volume's own earlier
    keys as hard false negatives. Under DDP the ids are gathered with the keys.

    Args:
        dim: embedding width.
        queue_size: number of negative keys kept (K).
        temperature: softmax temperature (> 0).
        gather_distributed: enqueue the keys of every rank under DDP.

    Raises:
        ValueError: non-positive ``dim``, ``queue_size`` or ``temperature``.
    """

    def __init__(self, dim: int, queue_size: int = DEFAULT_QUEUE_SIZE, temperature: float = DEFAULT_TEMPERATURE,
                 gather_distributed: bool = True) -> None:
        super().__init__()
        if dim < 1 or queue_size < 1:
            raise ValueError(f"dim and queue_size must be >= 1, got dim={dim}, queue_size={queue_size}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.gather_distributed = gather_distributed
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))
        self.register_buffer("queue_ids", torch.full((queue_size,), EMPTY_ID, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @property
    def queue_size(self) -> int:
        """K, the number of queued keys."""
        return self.queue.shape[0]

    def forward(self, q: Tensor, k: Tensor, ids: Tensor | None = None) -> Tensor:
        """InfoNCE of ``q`` against ``k`` and the queue (the queue is not changed).

        Args:
            q: queries (B, dim), with gradient.
            k: keys (B, dim); treated as constants (detached).
            ids: volume ids (B,) of the queries; queued keys with the same id are not negatives.
                None: every queued key is a negative.

        Returns:
            The scalar loss.

        Raises:
            ValueError: ``q`` and ``k`` not both (B, dim) with the queue's dim, or ``ids`` not (B,).
        """
        if q.ndim != 2 or q.shape != k.shape or q.shape[1] != self.queue.shape[1]:
            raise ValueError(
                f"q and k must both be (B, {self.queue.shape[1]}), got {tuple(q.shape)} and {tuple(k.shape)}"
            )
        if ids is not None and tuple(ids.shape) != (q.shape[0],):
            raise ValueError(f"ids must be ({q.shape[0]},), one volume id per query, got {tuple(ids.shape)}")
        q = F.normalize(q, dim=1)
        k = F.normalize(k.detach(), dim=1)
        positive = (q * k).sum(dim=1, keepdim=True)  # (B, 1)
        # A copy: enqueue() writes the queue in place before this graph's backward runs.
        negative = q @ self.queue.clone().detach().to(q.dtype).T  # (B, K)
        if ids is not None:
            same_volume = ids.to(self.queue_ids.device)[:, None] == self.queue_ids[None, :]
            negative = negative.masked_fill(same_volume, float("-inf"))
        logits = torch.cat([positive, negative], dim=1) / self.temperature
        return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))

    @torch.no_grad()
    def enqueue(self, keys: Tensor, ids: Tensor | None = None) -> None:
        """Write ``keys`` (B, dim) and their volume ids (B,) (of every rank under DDP) over the oldest entries.

        Keys are L2-normalised; the pointer advances by their number modulo ``queue_size``. More
        keys than the queue holds keep only the newest ``queue_size``. Without ``ids`` the
        entries get :data:`EMPTY_ID`.

        Raises:
            ValueError: ``ids`` not (B,).
        """
        if ids is None:
            ids = torch.full((keys.shape[0],), EMPTY_ID, dtype=torch.long, device=keys.device)
        elif tuple(ids.shape) != (keys.shape[0],):
            raise ValueError(f"ids must be ({keys.shape[0]},), one volume id per key, got {tuple(ids.shape)}")
        keys = F.normalize(keys.detach().float(), dim=1)
        ids = ids.to(device=keys.device, dtype=torch.long)
        if self.gather_distributed and _distributed():
            keys, ids = _gather(keys), _gather(ids)
        size = self.queue_size
        keys, ids = keys[-size:], ids[-size:]
        n = keys.shape[0]
        idx = (self.queue_ptr + torch.arange(n, device=keys.device)) % size
        self.queue[idx] = keys.to(self.queue.dtype)
        self.queue_ids[idx] = ids.to(self.queue_ids.device)
        self.queue_ptr.copy_((self.queue_ptr + n) % size)
