"""``medssl3d finetune``: the segmentation bundle from a pretrained encoder (or scratch), resumable.

The job runs ``bundles/segmentation/configs/train.json`` with the data, the encoder and the run folder as
overrides. The bundle builds the network the encoder describes (SwinUNETR or UNETR, its width, crop and
preset) and writes, under ``--out``: ``models/model.pt`` (the best validation model), ``models/checkpoint*.pt``
(the full training state, from which the same command resumes) and TensorBoard scalars in ``eval/``. The job
records the network and preprocessing it trained in ``run.json``; ``medssl3d evaluate`` and
``medssl3d predict`` rebuild the same network from that record.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import medssl3d
from medssl3d.data.atomic_files import atomic_write_json
from medssl3d.data.errors import InputError
from medssl3d.jobs.bundles import BundleJob, bundle_dir, parse_overrides, progress_handlers, read_configs
from medssl3d.jobs.inputs import datalist_for

logger = logging.getLogger(__name__)

SEGMENTATION = "segmentation"
RUN_RECORD = "run.json"
MODEL = "model.pt"
SCRATCH = "none"
#: The bundle ids that fix the network and its preprocessing: recorded by finetune, reused by evaluate/predict.
NETWORK_SETTINGS = (
    "arch", "backbone_size", "feature_size", "roi_size", "vit_hidden_size", "vit_mlp_dim", "vit_num_heads", "modality",
    "spacing_mm", "label_names",
)
SHOWN = (
    "datalist", "pretrained", "ckpt_dir", "output_dir", *NETWORK_SETTINGS, "num_classes", "preset",
    "learning_rate", "encoder_lr_scale", "warmup_epochs", "freeze_encoder_epochs", "batch_size", "num_samples",
    "val_interval", "train#trainer#max_epochs",
)


@dataclass(frozen=True)
class FinetuneRequest:
    """What ``medssl3d finetune`` was asked to do.

    Attributes:
        data: a labelled folder, an nnU-Net raw dataset folder or a datalist JSON.
        pretrained: an exported encoder file, or ``"none"`` to train from scratch.
        out: the run folder.
        epochs: training epochs of the whole run (``None``: the bundle's).
        modality: ``"ct"`` / ``"mri"`` (``None``: the encoder's, else the bundle's).
        size: ``"tiny"`` / ``"small"`` / ``"base"`` encoder, as pretraining names it (``None``: the encoder's,
            else ``base``); the bundle's ``backbone_size``.
        overrides: ``id=value`` bundle overrides; they win.

    Raises:
        InputError: the encoder file does not exist.
        ValueError: ``epochs`` < 1.
    """

    data: str
    pretrained: str
    out: str
    epochs: int | None = None
    modality: str | None = None
    size: str | None = None
    overrides: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"--epochs must be >= 1, got {self.epochs}")
        if self.pretrained.lower() != SCRATCH and not Path(self.pretrained).expanduser().is_file():
            raise InputError(Path(self.pretrained).expanduser(), "pretrained encoder not found (or pass 'none')")

    @property
    def out_dir(self) -> Path:
        """The run folder, absolute."""
        return Path(self.out).expanduser().resolve()

    @property
    def encoder(self) -> str:
        """The bundle's ``pretrained`` value: the absolute encoder path, or ``""`` for scratch."""
        return "" if self.pretrained.lower() == SCRATCH else str(Path(self.pretrained).expanduser().resolve())


def finetune_job(request: FinetuneRequest, datalist: Path) -> BundleJob:
    """The segmentation bundle's training run of ``request`` on ``datalist``."""
    bundle = bundle_dir(SEGMENTATION)
    configs = ("train",)
    out = request.out_dir
    overrides: dict[str, Any] = {
        "datalist": str(datalist),
        "pretrained": request.encoder,
        "ckpt_dir": str(out / "models"),
        "output_dir": str(out / "eval"),
        **progress_handlers(read_configs(bundle, configs), "train#handlers", "training"),
    }
    if request.epochs is not None:
        overrides["train#trainer#max_epochs"] = request.epochs
    if request.modality is not None:
        overrides["modality"] = request.modality
    if request.size is not None:
        overrides["backbone_size"] = request.size
    return BundleJob(
        bundle=bundle, configs=configs, workflow_type="train", overrides=overrides,
        user_overrides=parse_overrides(request.overrides), shown=SHOWN,
    )


def write_run_record(run_dir: Path, record: Mapping[str, Any]) -> Path:
    """Write ``run.json``, refusing a run folder whose earlier record trained another network.

    Raises:
        ValueError: the folder's record differs in a network setting (resuming would load the wrong weights).
    """
    path = run_dir / RUN_RECORD
    if path.is_file():
        earlier = read_run_record(run_dir)["settings"]
        # a setting the earlier record lacks (written by an older version) is not a difference
        changed = sorted(k for k in NETWORK_SETTINGS if k in earlier and earlier[k] != record["settings"].get(k))
        if changed:
            first = changed[0]
            raise ValueError(f"{path}: this run was fine-tuned with {first}={earlier.get(first)!r}, now "
                             f"{record['settings'].get(first)!r} ({', '.join(changed)} differ); use another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    return atomic_write_json(path, record)


def read_run_record(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``run.json`` of a fine-tuning run folder.

    Raises:
        InputError: the folder has no (readable) record.
    """
    path = Path(run_dir).expanduser().resolve() / RUN_RECORD
    if not path.is_file():
        raise InputError(path.parent, f"not a fine-tuning run folder (no {RUN_RECORD}; medssl3d finetune writes it)")
    try:
        record = json.loads(path.read_text())
    except ValueError as e:
        raise InputError(path, f"not valid JSON: {e}") from e
    if not isinstance(record, dict) or not isinstance(record.get("settings"), dict):
        raise InputError(path, "has no 'settings' (not written by medssl3d finetune)")
    return record


def trained_model(run_dir: str | os.PathLike) -> Path:
    """``models/model.pt`` of a run folder.

    Raises:
        InputError: there is none yet (the bundle saves it at validation).
    """
    path = Path(run_dir).expanduser().resolve() / "models" / MODEL
    if not path.is_file():
        raise InputError(path, "not found: the run has not saved a model yet (it is saved at each validation)")
    return path


def run_finetune(request: FinetuneRequest, *, dry_run: bool = False) -> int:
    """Run (or with ``dry_run`` describe) ``request``; returns the exit status.

    Raises:
        InputError: missing or unreadable data or encoder.
        ValueError: a bad option, override, encoder for another network or label value (MONAI's wrappers removed).
    """
    out = request.out_dir
    datalist = datalist_for(request.data, out, modality=request.modality, write=not dry_run)
    job = finetune_job(request, datalist)
    if dry_run:
        print(job.describe())
        return 0
    settings = job.resolve(NETWORK_SETTINGS)
    write_run_record(out, {
        "bundle": SEGMENTATION,
        "datalist": str(datalist),
        "pretrained": request.encoder,
        "settings": settings,
        "medssl3d_version": medssl3d.__version__,
    })
    workflow = job.run().workflow
    trainer = workflow.parser.get_parsed_content("train#trainer")
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    line = (f"fine-tuned {settings['arch']} ({settings['backbone_size']}, feature_size {settings['feature_size']}) "
            f"to epoch {trainer.state.epoch}/{trainer.state.max_epochs}")
    if evaluator.state.best_metric_epoch > 0:  # MONAI's -1: no validation in this process
        line += (f"; best validation mean Dice {evaluator.state.best_metric:.4f} "
                 f"at epoch {evaluator.state.best_metric_epoch}")
    print(line)
    print(f"model: {out / 'models' / MODEL}")
    return 0
