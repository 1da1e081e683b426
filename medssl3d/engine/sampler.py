"""A resumable, shardable sampler and per-sample seeding of random transforms.

Exact resume needs two things from the data side: the same sample order (a permutation that
depends only on ``(seed, epoch)``, with the first ``k`` samples skippable) and the same
augmentation for each sample, which MONAI transforms draw from their own ``self.R``.
:class:`SeededDataset` reseeds a dataset's transform from ``(seed, epoch, index)`` before each
item, so augmentation no longer depends on worker count, resume point or rank.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


class ResumableSampler(Sampler):
    """DistributedSampler-like sampler that knows its epoch and can start mid-epoch.

    Every rank computes the same permutation of ``range(n)`` from ``(seed, epoch)``, pads it to a
    multiple of ``num_replicas`` (or drops the tail with ``drop_last``) and takes every
    ``num_replicas``-th index from ``rank``. :meth:`set_start` skips this rank's first ``k``
    indices for the current epoch only.

    Args:
        data_source: the dataset (or its length).
        shuffle: permute per epoch; otherwise sequential.
        seed: permutation seed, shared by all ranks.
        num_replicas: number of ranks (1 when not distributed).
        rank: this rank.
        drop_last: drop the tail that does not divide evenly over ranks instead of padding.
        with_epoch: yield ``(epoch, index)`` keys for :class:`SeededDataset` instead of indices.
    """

    def __init__(
        self,
        data_source: Sized | int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
        with_epoch: bool = False,
    ):
        n = data_source if isinstance(data_source, int) else len(data_source)
        if n < 1:
            raise ValueError(f"cannot sample from an empty dataset (length {n})")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, num_replicas={num_replicas})")
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.num_replicas, self.rank, self.drop_last = num_replicas, rank, drop_last
        self.with_epoch = with_epoch
        self.epoch = 0
        self.start = 0
        per_rank = n / num_replicas
        self.num_samples = math.floor(per_rank) if drop_last else math.ceil(per_rank)
        if self.num_samples < 1:
            raise ValueError(f"{n} samples cannot be split over {num_replicas} ranks with drop_last")

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation is drawn (resets the start to 0)."""
        self.epoch = epoch
        self.start = 0

    def set_start(self, k: int) -> None:
        """Skip this rank's first ``k`` indices of the current epoch."""
        if not 0 <= k <= self.num_samples:
            raise ValueError(f"start {k} is not in [0, {self.num_samples}]")
        self.start = k

    def indices(self) -> list[int]:
        """This rank's full index list for the current epoch (before skipping)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = self.num_samples * self.num_replicas
        if total > len(order):
            order += (order * math.ceil(total / len(order)))[: total - len(order)]
        return order[:total][self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[Any]:
        for i in self.indices()[self.start :]:
            yield (self.epoch, i) if self.with_epoch else i

    def __len__(self) -> int:
        return self.num_samples - self.start


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed that depends only on ``(seed, epoch, index)``."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class SeededDataset(Dataset):
    """Wrap a map-style dataset so its random transform is reseeded per ``(seed, epoch, index)``.

    Keys are ``(epoch, index)`` pairs from ``ResumableSampler(with_epoch=True)`` or plain indices
    (epoch 0). The wrapped dataset's ``transform`` must offer ``set_random_state(seed=...)``
    (every MONAI ``Compose`` / ``Randomizable`` does); datasets without one are passed through.

    Args:
        dataset: the wrapped dataset.
        seed: base seed of the run.
    """

    def __init__(self, dataset: Dataset, seed: int = 0):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Any) -> Any:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        transform = getattr(self.dataset, "transform", None)
        if transform is not None and hasattr(transform, "set_random_state"):
            transform.set_random_state(seed=sample_seed(self.seed, epoch, index))
        return self.dataset[index]
