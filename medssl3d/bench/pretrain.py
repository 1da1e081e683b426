"""The pretraining bundles as the benchmarks drive them: each method's own dataset, network and recipe, at one size.

A benchmark never rebuilds a method's view generation or training settings itself: it runs
``bundles/<method>/configs/train.json`` through MONAI's ``ConfigWorkflow`` with overrides that only set
the data, the folders, the size (``backbone_size``, ``roi_size``, the preset's spacing) and the budget
(steps, batch size, seed), plus any per-method size settings the suite names (e.g. ACE's ``grid_n``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medssl3d.data.presets import PresetConfig
from medssl3d.jobs.bundles import resource_dir
from medssl3d.transfer.export import STATE_DICT_KEY, load_weights_file

logger = logging.getLogger(__name__)

BUNDLES_DIR = resource_dir("bundles")
TRAIN_CONFIG = "train.json"
META_CONFIG = "metadata.json"
#: Share of a short run spent in the learning-rate warm-up (at least one step).
WARMUP_FRACTION = 0.1


@dataclass(frozen=True)
class PretrainResult:
    """What one bundle pretraining run left behind.

    Attributes:
        method: the method (bundle) name.
        encoder: the exported encoder weights (``export_path`` of the bundle).
        export_target: ``"swinunetr"`` or ``"unetr"``: the MONAI network the weights load into.
        steps: optimizer steps taken (0: the encoder as built, before any step).
        final_loss: the loss of the last step (``None`` without a step).
        time_s: wall time of the training loop.
    """

    method: str
    encoder: Path
    export_target: str
    steps: int
    final_loss: float | None
    time_s: float


def bundle_dir(method: str) -> Path:
    """``bundles/<method>`` of this checkout.

    Raises:
        ValueError: there is no such bundle.
    """
    path = BUNDLES_DIR / method
    if not (path / "configs" / TRAIN_CONFIG).is_file():
        known = sorted(p.parent.parent.name for p in BUNDLES_DIR.glob(f"*/configs/{TRAIN_CONFIG}"))
        raise ValueError(f"no pretraining bundle {method!r} in {BUNDLES_DIR}; found {known}")
    return path


def pretraining_overrides(
    *,
    datalist: str | os.PathLike,
    run_dir: str | os.PathLike,
    cache_dir: str | os.PathLike,
    preset: PresetConfig,
    backbone_size: str,
    roi: int,
    batch_size: int,
    seed: int = 0,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Overrides that run a pretraining bundle on ``datalist`` at one size, writing only under ``run_dir``.

    Args:
        datalist: Decathlon-style JSON of the (unlabelled) pretraining images.
        run_dir: the run's folder (``runs/`` with checkpoints and metrics, ``models/`` with the export).
        cache_dir: the preprocessing cache (shared between runs: one sub-folder per preset).
        preset: the preprocessing (modality and spacing).
        backbone_size: ``"tiny"``, ``"small"`` or ``"base"``.
        roi: cubic crop side in voxels.
        batch_size: volumes per step.
        seed: the run's seed.
        extra: per-method bundle settings (e.g. ``{"grid_n": 4}`` for ACE at 64³); they win.

    Returns:
        ``{bundle id: value}`` for ``ConfigWorkflow``.
    """
    run_dir = Path(run_dir)
    return {
        "datalist": str(datalist),
        "output_dir": str(run_dir / "runs"),
        "ckpt_dir": str(run_dir / "models"),
        "cache_dir": str(cache_dir),
        "modality": preset.modality,
        "preset": preset,
        "backbone_size": backbone_size,
        "roi_size": [int(roi)] * 3,
        "train#trainer#config#batch_size": int(batch_size),
        "train#trainer#config#num_workers": 0,
        "seed": int(seed),
        "train#trainer#config#tensorboard": False,
        # a benchmark run starts afresh; its folder is new, so this only guards against reuse
        "train#trainer#config#resume": None,
        **dict(extra or {}),
    }


def pretraining_workflow(method: str, overrides: Mapping[str, Any]):
    """The method's bundle as a ``ConfigWorkflow`` with ``overrides``, initialised (its ids can be parsed).

    The bundle's ``logging.conf`` is not applied: the caller's logging set-up stays as it is.
    """
    from monai.bundle import ConfigWorkflow

    root = bundle_dir(method)
    workflow = ConfigWorkflow(
        config_file=str(root / "configs" / TRAIN_CONFIG),
        meta_file=str(root / "configs" / META_CONFIG),
        logging_file=False,
        workflow_type="train",
        bundle_root=str(root),
        **dict(overrides),
    )
    workflow.initialize()
    return workflow


def export_target(method: str, overrides: Mapping[str, Any]) -> str:
    """The MONAI network ``bundles/<method>`` exports its encoder for under ``overrides`` (nothing is built)."""
    return str(pretraining_workflow(method, overrides).parser.get_parsed_content("export_target"))


def initial_encoder(method: str, overrides: Mapping[str, Any]) -> PretrainResult:
    """Export the encoder of ``bundles/<method>`` as built, before any optimizer step.

    The bundle seeds the network before building it (its ``seed`` id), so this is the start from which every run
    of the method with the same seed trains; the bundles of one backbone family build the same encoder from one
    seed, so it is their shared start too. Fine-tuned with the pretrained arms' recipe, it is the control that
    separates what pretraining learned from the start it had.

    Args:
        method: bundle name.
        overrides: from :func:`pretraining_overrides` (its ``run_dir`` receives the export).

    Returns:
        The export, with ``steps`` 0 and no loss.
    """
    # before any step a method's teacher is its student: the student says so without a warning about the EMA
    workflow = pretraining_workflow(method, {**overrides, "export_source": "student"})
    encoder = Path(workflow.parser.get_parsed_content("export"))
    result = PretrainResult(method=method, encoder=encoder,
                            export_target=str(workflow.parser.get_parsed_content("export_target")),
                            steps=0, final_loss=None, time_s=0.0)
    workflow.finalize()
    return result


def weight_change(encoder: str | os.PathLike, start: str | os.PathLike) -> float:
    """How far an encoder moved from its start: ``‖w − w₀‖ / ‖w₀‖`` over the weight matrices and kernels.

    Only floating-point tensors of two or more axes that both files hold under the same name and shape count:
    norm scales and biases start at constants, and integer buffers (Swin's relative position index, values in
    the thousands) are not weights and would swamp the norm.

    Raises:
        ValueError: a missing file, or no such tensor in common.
    """
    moved, size = load_weights_file(encoder), load_weights_file(start)
    moved, size = moved.get(STATE_DICT_KEY, moved), size.get(STATE_DICT_KEY, size)
    pairs = [(moved[k].double(), w0.double()) for k, w0 in size.items()
             if w0.is_floating_point() and w0.dim() >= 2 and k in moved and moved[k].shape == w0.shape]
    if not pairs:
        raise ValueError(f"{str(encoder)!r} and {str(start)!r} share no weight matrix")
    change = sum(float((a - b).pow(2).sum()) for a, b in pairs)
    return (change / sum(float(b.pow(2).sum()) for _, b in pairs)) ** 0.5


def failure_text(error: BaseException) -> str:
    """``"<Type>: <message>"`` of the innermost cause of ``error`` (MONAI wraps transform errors in layers)."""
    while error.__cause__ is not None:
        error = error.__cause__
    return f"{type(error).__name__}: {error}"


def fill_caches(dataset) -> float:
    """Draw every item of a bundle's training dataset once; returns the seconds it took.

    This fills the on-disk preprocessing cache (and per-volume caches such as registrations) before training,
    so that no batch mixes a freshly preprocessed item with one read back from the cache: MONAI's
    ``CropForegroundd`` coordinates come back as numpy arrays the first time and as tensors from the cache,
    and such a batch cannot be collated.
    """
    start = time.perf_counter()
    for index in range(len(dataset)):
        dataset[index]
    return time.perf_counter() - start


def pretrain(method: str, overrides: Mapping[str, Any], *, steps: int) -> PretrainResult:
    """Run ``bundles/<method>`` for exactly ``steps`` optimizer steps and export its encoder.

    Args:
        method: bundle name (= method name).
        overrides: from :func:`pretraining_overrides`.
        steps: the budget, identical for every method of a comparison.

    Returns:
        Where the encoder went and how the run ended.

    Raises:
        ValueError: ``steps`` < 1, or the bundle's run section gave no training summary.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    budget = {
        "train#trainer#max_epochs": None,
        "train#trainer#max_steps": int(steps),
        "train#trainer#config#warmup_steps": max(1, int(steps * WARMUP_FRACTION)),
        "train#trainer#config#ckpt_every": int(steps),
        "train#trainer#config#log_every": 1,
    }
    workflow = pretraining_workflow(method, {**overrides, **budget})
    seconds = fill_caches(workflow.parser.get_parsed_content("train#dataset"))
    logger.info("pretraining %s for %d steps (caches filled in %.1f s)", method, steps, seconds)
    outputs = workflow.run()
    workflow.finalize()
    summary = next((o for o in outputs if isinstance(o, dict) and "final_loss" in o), None)
    if summary is None:
        raise ValueError(f"bundle {method!r}: its run section returned no training summary")
    return PretrainResult(
        method=method,
        encoder=Path(workflow.parser.get_parsed_content("export_path")),
        export_target=str(workflow.parser.get_parsed_content("export_target")),
        steps=int(summary["step"]),
        final_loss=float(summary["final_loss"]),
        time_s=float(summary["time_s"]),
    )
