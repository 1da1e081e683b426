"""Ignite handler recording which cases each rank trained on, one JSON file per rank.

Under ``torchrun`` every rank loads its own shard of the data (``DistributedSampler``). These files make
that visible: they show that the ranks saw different cases and together covered the training split.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from monai.utils import IgniteInfo, min_version, optional_import

from medssl3d.data.atomic_files import atomic_write_json
from medssl3d.engine import distributed

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

logger = logging.getLogger(__name__)

DEFAULT_IMAGE_KEY = "image"
DEFAULT_PREFIX = "rank"
FILENAME_META_KEY = "filename_or_obj"


class RankCaseRecorder:
    """Write ``<output_dir>/<prefix><rank>_cases.json`` after every epoch of a trainer, on every rank.

    The file holds ``{"rank": R, "world_size": W, "epochs": {"1": [case, ...], ...}}``: for each completed
    epoch the sorted, distinct source files (``meta["filename_or_obj"]`` of ``image_key``) of the batches
    this rank trained on. Several random crops of one case count once. With ``DistributedSampler`` the
    ranks' lists of an epoch are disjoint when the number of cases is a multiple of the world size;
    otherwise the sampler pads the last shard with repeated cases. The file is rewritten atomically each
    epoch, so an interrupted run keeps the record of its completed epochs.

    Args:
        output_dir: folder for the files (created).
        image_key: key of the batch whose meta names the source file.
        prefix: file name prefix; the rank number and ``_cases.json`` follow.
    """

    def __init__(
        self, output_dir: str | os.PathLike, *, image_key: str = DEFAULT_IMAGE_KEY, prefix: str = DEFAULT_PREFIX
    ) -> None:
        self.output_dir = Path(output_dir)
        self.image_key = image_key
        self.prefix = prefix
        self._epochs: dict[str, list[str]] = {}
        self._current: set[str] = set()

    @property
    def path(self) -> Path:
        """This rank's file (the rank is read when called, after the process group exists)."""
        return self.output_dir / f"{self.prefix}{distributed.rank()}_cases.json"

    def attach(self, engine: Engine) -> None:
        """Register with ``engine``: reset per epoch, collect case names per iteration, write per epoch."""
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _reset(self, _engine: Engine) -> None:
        self._current = set()

    def _collect(self, engine: Engine) -> None:
        self._current.update(case_names(engine.state.batch, self.image_key))

    def __call__(self, engine: Engine) -> None:
        """Add the finished epoch's cases to the record and rewrite this rank's file."""
        self._epochs[str(engine.state.epoch)] = sorted(self._current)
        record = {"rank": distributed.rank(), "world_size": distributed.world_size(), "epochs": self._epochs}
        atomic_write_json(self.path, record, durable=False)
        logger.debug("epoch %d: rank %d trained on %d cases", engine.state.epoch, record["rank"], len(self._current))


def case_names(batch: Any, image_key: str = DEFAULT_IMAGE_KEY) -> list[str]:
    """Source file names of a batch: a list of items (decollated, as MONAI engines leave it) or one dict.

    Args:
        batch: ``[{"image": MetaTensor, ...}, ...]`` or a collated ``{"image": MetaTensor (B, C, D, H, W)}``.
        image_key: key whose MetaTensor meta holds ``filename_or_obj``.

    Returns:
        One name per item (a collated batch gives one per batch element).

    Raises:
        ValueError: an item has no ``image_key`` or its value carries no file name.
    """
    names: list[str] = []
    for item in batch if isinstance(batch, list) else [batch]:
        if image_key not in item:
            raise ValueError(f"image_key={image_key!r} is not in the batch (keys: {sorted(item)})")
        name = getattr(item[image_key], "meta", {}).get(FILENAME_META_KEY)
        if name is None:
            raise ValueError(f"batch[{image_key!r}] has no meta[{FILENAME_META_KEY!r}] to name its case")
        names.extend([name] if isinstance(name, (str, os.PathLike)) else name)
    return [str(n) for n in names]
