"""The pretraining loader: a resumable, rank-sharded ``DataLoader`` from a dataset or a user's loader.

:class:`~medssl3d.engine.trainer.Pretrainer` builds its loader here, so that the sample order
depends only on ``(seed, epoch)`` (:class:`~medssl3d.engine.sampler.ResumableSampler`) and, with
``seed_transforms``, every sample's augmentation on ``(seed, epoch, index)``
(:class:`~medssl3d.engine.sampler.SeededDataset`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from medssl3d.engine import distributed as dist_utils
from medssl3d.engine.config import TrainConfig
from medssl3d.engine.sampler import ResumableSampler, SeededDataset

logger = logging.getLogger(__name__)

__all__ = ["resumable_loader", "to_device"]


def to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor in it (through dicts, lists and tuples) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=device.type == "cuda")
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def resumable_loader(src: DataLoader | Dataset, config: TrainConfig, device: torch.device) -> DataLoader:
    """A loader over ``src`` with a :class:`ResumableSampler` sharded over this process's rank.

    Args:
        src: a map-style ``Dataset`` (loaded with ``config.batch_size`` / ``config.num_workers``,
            shuffled), or a ``DataLoader``: kept when its sampler is already resumable, else rebuilt
            with the same dataset, batch size, workers and collate function (shuffled when its
            sampler was a ``RandomSampler``).
        config: the run's settings (``seed``, ``seed_transforms``, ``drop_last``, batch size, workers).
        device: the training device (memory is pinned for CUDA).

    Returns:
        The loader, with its own ``torch.Generator``.

    Raises:
        ValueError: a ``DataLoader`` with a custom batch sampler.
    """
    world, rank = dist_utils.world_size(), dist_utils.rank()
    if isinstance(src, DataLoader):
        if isinstance(src.sampler, ResumableSampler):
            loader = src
        else:
            if src.batch_size is None:
                raise ValueError("a DataLoader with a custom batch_sampler cannot be made resumable")
            shuffle = isinstance(src.sampler, RandomSampler) or getattr(src.sampler, "shuffle", False)
            loader = _make_loader(
                src.dataset, src.batch_size, shuffle, world, rank, config,
                num_workers=src.num_workers, collate_fn=src.collate_fn, pin_memory=src.pin_memory,
                drop_last=src.drop_last, worker_init_fn=src.worker_init_fn,
                persistent_workers=src.persistent_workers, timeout=src.timeout,
            )
            logger.info("rebuilt the train loader with a resumable sampler (shuffle=%s)", shuffle)
    else:
        loader = _make_loader(
            src, config.batch_size, True, world, rank, config,
            num_workers=config.num_workers, pin_memory=device.type == "cuda", drop_last=config.drop_last,
        )
    if loader.generator is None:
        # The loader draws its workers' base seed from this generator, not the global RNG,
        # so creating an iterator mid-epoch on resume leaves the global RNG stream unchanged.
        loader.generator = torch.Generator()
    return loader


def _make_loader(
    dataset: Dataset, batch_size: int, shuffle: bool, world: int, rank: int, config: TrainConfig, **kwargs: Any
) -> DataLoader:
    sampler = ResumableSampler(
        len(dataset), shuffle=shuffle, seed=config.seed, num_replicas=world, rank=rank,
        with_epoch=config.seed_transforms,
    )
    if config.seed_transforms:
        dataset = SeededDataset(dataset, seed=config.seed)
    if kwargs.get("num_workers", 0) == 0:
        kwargs.pop("persistent_workers", None)
    generator = torch.Generator()
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, generator=generator, **kwargs)
