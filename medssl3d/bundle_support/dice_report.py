"""Ignite handler writing Dice per class and per case, with label names, to JSON and CSV."""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from monai.utils import IgniteInfo, min_version, optional_import, string_list_all_gather

from medssl3d.data.atomic_files import atomic_write_json

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
idist, _ = optional_import("ignite", IgniteInfo.OPT_IMPORT_VERSION, min_version, "distributed")

logger = logging.getLogger(__name__)

DEFAULT_METRIC_NAME = "val_mean_dice"
DEFAULT_FILENAME = "dice_per_class"
DEFAULT_IMAGE_KEY = "image"
FILENAME_META_KEY = "filename_or_obj"


class DicePerClassWriter:
    """Write ``<save_dir>/<filename>.json`` and ``.csv`` when an evaluator's epoch completes.

    It reads the per-case details that MONAI's ``MeanDice`` handler keeps in ``engine.state.metric_details``
    (``save_details=True``, the default; already gathered across ranks), names each column by its label
    and reports the per-class mean over cases (NaN cases, where a class is absent from both label and
    prediction, are left out of that class's mean). Only rank 0 writes.

    Args:
        save_dir: output folder (created).
        label_names: ``{"0": "background", "1": "liver", ...}`` as in the bundle metadata ``channel_def``.
        include_background: whether the metric's first column is class 0
            (as ``MeanDice(include_background)``).
        metric_name: name of the ``MeanDice`` handler in the evaluator.
        filename: file stem for the JSON and CSV.
        image_key: key of the decollated batch whose meta holds the case's file name.
    """

    def __init__(
        self,
        save_dir: str | Path,
        label_names: Mapping[str | int, str],
        *,
        include_background: bool = False,
        metric_name: str = DEFAULT_METRIC_NAME,
        filename: str = DEFAULT_FILENAME,
        image_key: str = DEFAULT_IMAGE_KEY,
    ) -> None:
        ordered = [label_names[k] for k in sorted(label_names, key=int)]
        self.class_names = ordered if include_background else ordered[1:]
        self.save_dir = Path(save_dir)
        self.metric_name = metric_name
        self.filename = filename
        self.image_key = image_key
        self._cases: list[str] = []

    def attach(self, engine: Engine) -> None:
        """Register with ``engine``: reset per epoch, collect file names per iteration, write per epoch."""
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect_names)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _reset(self, _engine: Engine) -> None:
        self._cases = []

    def _collect_names(self, engine: Engine) -> None:
        for item in engine.state.batch:
            meta = getattr(item[self.image_key], "meta", {})
            self._cases.append(str(meta.get(FILENAME_META_KEY, f"case{len(self._cases)}")))

    def __call__(self, engine: Engine) -> None:
        """Write the report for the finished epoch (rank 0 only)."""
        cases = string_list_all_gather(self._cases) if idist.get_world_size() > 1 else self._cases
        if idist.get_rank() != 0:
            return
        details = getattr(engine.state, "metric_details", {}).get(self.metric_name)
        if details is None:
            raise ValueError(
                f"no per-case details for metric {self.metric_name!r}; use MeanDice(save_details=True)"
            )
        scores = torch.as_tensor(details, dtype=torch.float64).reshape(len(cases), -1)
        if scores.shape[1] != len(self.class_names):
            raise ValueError(
                f"metric {self.metric_name!r} has {scores.shape[1]} classes, label names {self.class_names}"
            )
        per_class = {name: _nanmean(scores[:, j]) for j, name in enumerate(self.class_names)}
        report = {
            "metric": self.metric_name,
            "per_class": per_class,
            # a class absent from every case (None) has no Dice and stays out of the mean
            "mean": _nanmean(torch.tensor([v for v in per_class.values() if v is not None], dtype=torch.float64)),
            "cases": [
                {"image": case, **{name: _as_float(scores[i, j]) for j, name in enumerate(self.class_names)}}
                for i, case in enumerate(cases)
            ],
        }
        self.save_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.save_dir / f"{self.filename}.json", report, durable=False)
        with open(self.save_dir / f"{self.filename}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["image", *self.class_names])
            writer.writeheader()
            writer.writerows(report["cases"])
            writer.writerow({"image": "mean", **per_class})
        logger.info("%s per class: %s (written to %s)", self.metric_name, per_class, self.save_dir)


def _nanmean(values: torch.Tensor) -> float | None:
    """Mean over finite entries; ``None`` (JSON null) when there are none."""
    finite = values[torch.isfinite(values)]
    return float(finite.mean()) if finite.numel() else None


def _as_float(value: torch.Tensor) -> float | None:
    return float(value) if torch.isfinite(value) else None
