"""Fine-tune and test through the segmentation bundle, as a user would: its recipe, its Dice report.

``bundles/segmentation`` runs in place: its configs are read from the checkout and everything it writes goes
to the run folder (``ckpt_dir``, ``output_dir``). The task's classes are passed as ``label_names`` (the
bundle reads them from its metadata by default), and the network follows the pretrained encoder: SwinUNETR
for a Swin encoder, UNETR (patch 16, the encoder's width) for a ViT one.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medssl3d.bundle_support.networks import network_widths
from medssl3d.bundle_support.workflow import run_workflow
from medssl3d.data.presets import PresetConfig
from medssl3d.jobs.bundles import bundle_dir

logger = logging.getLogger(__name__)

SEGMENTATION_BUNDLE = bundle_dir("segmentation")
DICE_REPORT = "dice_per_class.json"
#: Network families of the segmentation bundle by the encoder they take.
ARCH_BY_TARGET = {"swinunetr": "swinunetr", "unetr": "unetr"}
SLIDING_WINDOW_BATCH = 1
SNAPSHOT_DIR = "snapshots"


def snapshot_dir(run_dir: str | os.PathLike) -> Path:
    """Where a run of :func:`finetune_and_test` in ``run_dir`` keeps its snapshots (the bundle's ``ckpt_dir``)."""
    return Path(run_dir) / "models" / SNAPSHOT_DIR


def snapshot_file(epoch: int) -> str:
    """The name MONAI's ``CheckpointSaver`` gives the network it keeps after ``epoch`` (bundle's ``snapshot_every``)."""
    return f"model_epoch={epoch}.pt"


@dataclass(frozen=True)
class FinetuneRecipe:
    """The fine-tuning lengths and sizes shared by every arm of a comparison.

    Attributes:
        backbone_size: encoder size (``tiny`` / ``small`` / ``base``), as pretrained.
        roi: cubic crop side in voxels (SwinUNETR: a multiple of 32; UNETR: the ViT's grid).
        epochs: training epochs (one pass over the labelled units each).
        samples: random crops per labelled unit per epoch.
        lr: learning rate (of the decoder; the encoder's is ``lr * encoder_lr_scale`` when pretrained).
        seed: ``set_determinism`` seed of the bundle.
        warmup_epochs: linear learning-rate warm-up (the bundle's ``warmup_epochs``).
        encoder_lr_scale: pretrained encoder's learning rate as a fraction of ``lr``.
        freeze_encoder_epochs: epochs with a pretrained encoder not updated.
    """

    backbone_size: str
    roi: int
    epochs: int
    samples: int
    lr: float
    seed: int
    warmup_epochs: float = 0.0
    encoder_lr_scale: float = 1.0
    freeze_encoder_epochs: int = 0


def network_overrides(export_target: str, backbone_size: str, roi: int) -> dict[str, Any]:
    """The segmentation bundle's network settings for an encoder exported to ``export_target`` at a size.

    Raises:
        ValueError: a target or size the segmentation bundle cannot take.
    """
    if export_target not in ARCH_BY_TARGET:
        raise ValueError(f"the segmentation bundle takes {sorted(ARCH_BY_TARGET)} encoders, not {export_target!r}")
    arch = ARCH_BY_TARGET[export_target]
    network_widths(arch, backbone_size)  # refuses a size the network's encoder family lacks, before any run
    return {"arch": arch, "backbone_size": backbone_size, "roi_size": [int(roi)] * 3,
            "sw_batch_size": SLIDING_WINDOW_BATCH}


def finetune_and_test(
    run_dir: str | os.PathLike,
    datalist: str | os.PathLike,
    label_names: Mapping[str, str],
    preset: PresetConfig,
    recipe: FinetuneRecipe,
    *,
    export_target: str = "swinunetr",
    pretrained: str | os.PathLike | None = None,
    snapshot_epochs: Sequence[int] = (),
) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
    """Fine-tune on the ``training`` split, keep the model of the last validation, test on the ``test`` split.

    Validation runs once, after the last epoch (the bundle saves ``models/model.pt`` on validation), on the
    ``validation`` split; the test split is only seen by the evaluation. The networks of ``snapshot_epochs``
    (kept by the bundle's ``snapshot_every``) are tested too: a curve of Dice against training length from the
    one run, each point the same run stopped earlier (its learning rate not yet decayed).

    Args:
        run_dir: the run's folder (``models/``, ``eval/``).
        datalist: Decathlon-style JSON with ``training``, ``validation`` and ``test`` splits.
        label_names: ``{"0": "background", "1": ...}``.
        preset: preprocessing of training and test images.
        recipe: lengths and sizes.
        export_target: the encoder's family (``"swinunetr"`` or ``"unetr"``); also the network for scratch.
        pretrained: encoder weights to start from; ``None`` trains from scratch.
        snapshot_epochs: epochs (before the last) whose network is tested as well.

    Returns:
        ``(report, {epoch: report})``: the bundle's Dice report on the test split (``{"per_class": {name: dice},
        "mean": ..., "cases": [...]}``) for the final model and for each snapshot.

    Raises:
        ValueError: a snapshot epoch outside ``1 .. recipe.epochs - 1``.
    """
    run_dir = Path(run_dir)
    snapshot_epochs = sorted(set(snapshot_epochs))
    if any(not 0 < e < recipe.epochs for e in snapshot_epochs):
        raise ValueError(f"snapshot epochs must lie in 1 .. {recipe.epochs - 1}, got {snapshot_epochs}")
    overrides = {
        **network_overrides(export_target, recipe.backbone_size, recipe.roi),
        "datalist": str(datalist),
        "label_names": {str(k): v for k, v in label_names.items()},
        "modality": preset.modality,
        "preset": preset,
        "ckpt_dir": str(run_dir / "models"),
        "output_dir": str(run_dir / "eval"),
        "pretrained": str(pretrained) if pretrained else "",
        "num_samples": recipe.samples,
        "num_workers": 0,
        "learning_rate": recipe.lr,
        "warmup_epochs": recipe.warmup_epochs,
        "encoder_lr_scale": recipe.encoder_lr_scale,
        "freeze_encoder_epochs": recipe.freeze_encoder_epochs,
        "val_interval": recipe.epochs,
        "seed": recipe.seed,
        "train#trainer#max_epochs": recipe.epochs,
        # every epoch of the curve is a multiple of the interval the bundle keeps networks at
        "snapshot_every": math.gcd(*snapshot_epochs),
        # a benchmark run starts afresh: the state a stopped run left in its folder is not resumed
        "resume": False,
    }
    run_workflow(SEGMENTATION_BUNDLE, ["train"], "train", overrides)
    report = _test(overrides, run_dir / "eval")
    snapshots = snapshot_dir(run_dir)
    curve = {e: _test({**overrides, "eval_checkpoint": str(snapshots / snapshot_file(e))}, run_dir / f"eval_epoch{e}")
             for e in snapshot_epochs}
    return report, curve


def _test(overrides: Mapping[str, Any], output_dir: Path) -> dict[str, Any]:
    """The Dice report of the segmentation bundle's evaluation on the ``test`` split, written to ``output_dir``."""
    run_workflow(SEGMENTATION_BUNDLE, ["train", "evaluate"], "train",
                 {**overrides, "eval_split": "test", "output_dir": str(output_dir)})
    return json.loads((output_dir / DICE_REPORT).read_text())
