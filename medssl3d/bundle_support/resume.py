"""Resumable fine-tuning: the full training state saved by MONAI's ``CheckpointSaver``, loaded on the next run.

The segmentation bundle's best-model ``model.pt`` holds the network only. :class:`ResumeCheckpoint` adds the
state a run needs to continue: network, optimizer, learning-rate schedule and the trainer's own counters
(epoch, iteration). It writes ``checkpoint_epoch=<N>.pt`` after every ``save_interval`` epochs and
``checkpoint.pt`` when the run ends (also when it fails), and a new run with the same ``save_dir`` starts
from the newest of them. A run that had already reached ``max_epochs`` then does nothing; a larger
``max_epochs`` continues it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from monai.handlers import CheckpointLoader, CheckpointSaver
from monai.utils import IgniteInfo, min_version, optional_import

Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
idist, _ = optional_import("ignite", IgniteInfo.OPT_IMPORT_VERSION, min_version, "distributed")

logger = logging.getLogger(__name__)

FINAL_NAME = "checkpoint.pt"
#: ``CheckpointSaver`` names its epoch checkpoints ``checkpoint_epoch=<N>.pt`` (ignite's ``Checkpoint``).
EPOCH_GLOB = "checkpoint_epoch=*.pt"
TRAINER_KEY = "trainer"


def latest_checkpoint(save_dir: str | os.PathLike) -> Path | None:
    """The newest full-state checkpoint in ``save_dir`` (by modification time), or ``None`` when there is none."""
    folder = Path(save_dir)
    candidates = [p for p in (folder / FINAL_NAME, *folder.glob(EPOCH_GLOB)) if p.is_file()]
    return max(candidates, key=lambda p: (p.stat().st_mtime_ns, p.name)) if candidates else None


class ResumeCheckpoint:
    """Ignite handler: resume a trainer from ``save_dir`` when a checkpoint is there, and keep saving to it.

    Every process loads (so that all ranks continue from the same state); only rank 0 saves.

    Args:
        save_dir: folder of the checkpoints (created by the saver).
        save_dict: ``{"network": ..., "optimizer": ..., "lr_scheduler": ...}``: objects with ``state_dict``;
            the trainer it is attached to is added as ``"trainer"``. Pass the bare network, not a DDP wrapper.
        save_interval: epochs between epoch checkpoints.
        map_location: ``torch.load``'s ``map_location`` (the trainer's device).

    Raises:
        ValueError: ``save_interval`` < 1, or ``save_dict`` names ``"trainer"`` itself.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        save_dict: Mapping[str, Any],
        *,
        save_interval: int = 1,
        map_location: Any = None,
    ) -> None:
        if save_interval < 1:
            raise ValueError(f"save_interval must be >= 1, got {save_interval}")
        if TRAINER_KEY in save_dict:
            raise ValueError(f"save_dict must not name {TRAINER_KEY!r}: the trainer is added when attached")
        self.save_dir = Path(save_dir)
        self.save_dict = dict(save_dict)
        self.save_interval = save_interval
        self.map_location = map_location
        self.resumed_from: Path | None = None

    def attach(self, engine: Engine) -> None:
        """Load the newest checkpoint when ``engine`` starts (if there is one) and save on rank 0."""
        objects = {**self.save_dict, TRAINER_KEY: engine}
        self.resumed_from = latest_checkpoint(self.save_dir)
        if self.resumed_from is not None:
            logger.info("resuming from %s", self.resumed_from)
            CheckpointLoader(str(self.resumed_from), objects, map_location=self.map_location).attach(engine)
        if idist.get_rank() == 0:
            CheckpointSaver(
                str(self.save_dir),
                objects,
                save_final=True,
                final_filename=FINAL_NAME,
                epoch_level=True,
                save_interval=self.save_interval,
                n_saved=1,
            ).attach(engine)
