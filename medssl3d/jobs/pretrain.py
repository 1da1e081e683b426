"""``medssl3d pretrain METHOD``: a method's pretraining bundle on a folder or datalist, resumable, 1 to N GPUs.

The job runs ``bundles/<method>/configs/train.json`` with overrides for the data, the run folder, the size and
the budget. Everything goes under ``--out``: ``datalist.json`` (when the data was a folder),
``runs/checkpoints/last.pt`` (the engine resumes from it when the same command runs again),
``runs/metrics.jsonl`` and ``models/encoder_<target>.pt``, the bundle's exported encoder with its description
(method, width, crop, preset), which ``medssl3d finetune --pretrained`` configures itself from. With
``--gpus N`` (N > 1) the command starts itself again under ``torchrun --nproc_per_node N`` with the bundle's
``multi_gpu_train.json`` overlay.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medssl3d.engine.config import config_defaults
from medssl3d.jobs.bundles import BundleJob, bundle_dir, parse_overrides, read_configs
from medssl3d.jobs.inputs import datalist_for

logger = logging.getLogger(__name__)

SIZES = ("tiny", "small", "base")
MODALITIES = ("ct", "mri")
TRAIN = "train"
MULTI_GPU = "multi_gpu_train"
#: A bundle value that only points at another id (``"@backbone_size"``, ``"@train#trainer#config#batch_size"``).
PURE_REFERENCE = re.compile(r"^@[\w#]+$")
#: A bundle value that is the method preset's value of a config field (``"$@method_preset_config.roi_size"``).
PRESET_VALUE = re.compile(r"^\$@method_preset_config\.\w+$")
#: The engine settings of a pretraining bundle: what it changes of :class:`~medssl3d.engine.config.TrainConfig`.
ENGINE_SETTINGS = "train#trainer#config"
#: Ids whose resolved values ``--dry-run`` prints besides the method's own settings.
SHOWN = (
    "datalist", "output_dir", "ckpt_dir", "cache_dir", "modality", "preset", "backbone_size", "roi_size",
    "export_target", "export_path", "train#trainer#max_steps", "train#trainer#max_epochs", ENGINE_SETTINGS,
)
#: Progress lines of a run given ``--steps`` (the engine logs every ``log_every`` steps, at most the bundle's).
PROGRESS_LINES = 20


@dataclass(frozen=True)
class PretrainRequest:
    """What ``medssl3d pretrain`` was asked to do.

    Attributes:
        method: the pretraining method (its bundle's name).
        data: a folder of scans, an nnU-Net raw dataset folder or a datalist JSON.
        out: the run folder (``None``: ``outputs/<method>``).
        modality: ``"ct"`` / ``"mri"`` (``None``: the bundle's).
        size: ``"tiny"`` / ``"small"`` / ``"base"`` encoder (``None``: the preset's or the bundle's).
        roi: cubic crop side in voxels (``None``: the preset's or the bundle's).
        steps: optimizer steps of the whole run (``None``: the bundle's epochs).
        preset: a preset of ``configs/methods/<method>.yaml``.
        gpus: processes to start under ``torchrun`` (1: this process).
        overrides: ``id=value`` bundle overrides; they win over everything above.
    """

    method: str
    data: str
    out: str | None = None
    modality: str | None = None
    size: str | None = None
    roi: int | None = None
    steps: int | None = None
    preset: str | None = None
    gpus: int = 1
    overrides: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        from medssl3d.methods import METHODS

        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; the pretraining methods are {sorted(METHODS)}")
        if self.modality is not None and self.modality not in MODALITIES:
            raise ValueError(f"--modality must be one of {MODALITIES}, got {self.modality!r}")
        if self.size is not None and self.size not in SIZES:
            raise ValueError(f"--size must be one of {SIZES}, got {self.size!r}")
        for name in ("roi", "steps", "gpus"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be >= 1, got {value}")

    @property
    def out_dir(self) -> Path:
        """The run folder, absolute."""
        return Path(self.out or Path("outputs") / self.method).expanduser().resolve()

    def argv(self, datalist: Path) -> list[str]:
        """This request as ``medssl3d`` arguments, reading ``datalist`` (for the processes ``torchrun`` starts)."""
        args = ["pretrain", self.method, "--data", str(datalist), "--out", str(self.out_dir), "--gpus", str(self.gpus)]
        for name in ("modality", "size", "roi", "steps", "preset"):
            value = getattr(self, name)
            if value is not None:
                args += [f"--{name}", str(value)]
        return [*args, *(item for pair in self.overrides for item in ("--set", pair))]


def method_section(parser, method: str) -> str:
    """The id of the bundle section that builds the method (its ``_target_`` is the method's builder).

    Raises:
        ValueError: the bundle has no such section.
    """
    from medssl3d.methods import METHODS

    target = METHODS[method].replace(":", ".")
    for key, value in parser.get().items():
        if isinstance(value, Mapping) and value.get("_target_") == target:
            return key
    raise ValueError(f"bundle {method!r} has no section with _target_ {target!r}")


def preset_overrides(method: str, preset: str) -> dict[str, Any]:
    """The bundle override selecting preset ``preset`` of ``configs/methods/<method>.yaml``: its ``method_preset``.

    The preset is resolved here too (:func:`~medssl3d.methods.presets.resolve_method_config`, as the bundle does),
    so that an unknown preset, field or type is refused before the run. Ids set explicitly win over the preset.

    Raises:
        InputError: the preset file is missing or the preset is malformed.
        ValueError: an unknown preset.
    """
    from medssl3d.methods.presets import resolve_method_config

    resolve_method_config(method, preset)
    return {"method_preset": preset}


def pretrain_job(request: PretrainRequest, datalist: Path, *, distributed: bool) -> BundleJob:
    """The bundle run of ``request`` reading ``datalist``; ``distributed`` adds the multi-GPU overlay.

    Raises:
        ValueError: a crop size for a bundle that derives it, or a bad preset.
    """
    bundle = bundle_dir(request.method)
    configs = (TRAIN, MULTI_GPU) if distributed else (TRAIN,)
    parser = read_configs(bundle, configs)
    out = request.out_dir
    overrides: dict[str, Any] = {
        "datalist": str(datalist),
        "output_dir": str(out / "runs"),
        "ckpt_dir": str(out / "models"),
    }
    if request.preset is not None:
        overrides.update(preset_overrides(request.method, request.preset))
    if request.modality is not None:
        overrides["modality"] = request.modality
    if request.size is not None:
        overrides["backbone_size"] = request.size
    if request.roi is not None:
        derived = parser.get("roi_size")
        if isinstance(derived, str) and not PRESET_VALUE.match(derived):
            raise ValueError(f"--roi: bundle {request.method!r} derives roi_size ({derived}); set what it is "
                             "derived from as id=value overrides instead")
        overrides["roi_size"] = [request.roi] * 3
    if request.steps is not None:
        engine = {**config_defaults(), **parser.get(ENGINE_SETTINGS)}
        log_every = min(int(engine["log_every"]), max(1, request.steps // PROGRESS_LINES))
        overrides.update({
            "train#trainer#max_epochs": None,
            "train#trainer#max_steps": request.steps,
            "train#trainer#config#log_every": log_every,
        })
    section = method_section(parser, request.method)
    plain = [f"{section}#{k}" for k, v in parser.get(section).items() if not k.startswith("_") and _is_plain(parser, v)]
    return BundleJob(
        bundle=bundle,
        configs=configs,
        workflow_type=TRAIN,
        overrides=overrides,
        user_overrides=parse_overrides(request.overrides),
        shown=(*SHOWN, *plain),
        shown_defaults={ENGINE_SETTINGS: config_defaults()},
    )


def _is_plain(parser, value: Any) -> bool:
    """A literal or a preset's value, or a reference to an id holding one: cheap to resolve, free of side effects."""
    if isinstance(value, str) and PURE_REFERENCE.match(value):
        value = parser.get(value[1:])
    return not (isinstance(value, str) and value.startswith(("$", "@", "%"))) or bool(PRESET_VALUE.match(value))


def under_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` (its environment names a rank and a world size)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def torchrun_command(request: PretrainRequest, datalist: Path) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc_per_node N -m medssl3d pretrain ...``."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(request.gpus),
        "-m", "medssl3d", *request.argv(datalist),
    ]


def run_pretrain(request: PretrainRequest, *, dry_run: bool = False) -> int:
    """Run (or with ``dry_run`` describe) ``request``; returns the exit status.

    Raises:
        InputError: missing or unreadable data.
        ValueError: a bad option, preset, override or bundle setting (MONAI's wrappers removed).
    """
    launch = request.gpus > 1 and not under_torchrun()
    datalist = datalist_for(request.data, request.out_dir, modality=request.modality, write=not dry_run)
    job = pretrain_job(request, datalist, distributed=request.gpus > 1)
    if launch:
        command = torchrun_command(request, datalist)
        description = job.describe()
        if dry_run:
            print(f"{description}\nwould run: {shlex.join(command)}")
            return 0
        logger.info("starting %d processes: %s", request.gpus, shlex.join(command))
        return subprocess.run(command, check=False).returncode
    if dry_run:
        print(job.describe())
        return 0
    summary, encoder = _outcome(job.run().results)
    if int(os.environ.get("RANK", "0")) == 0:
        resumed = f" (resumed from step {summary['start_step']})" if summary["resumed_from"] else ""
        print(f"{request.method}: step {summary['step']}/{summary['total_steps']}{resumed}, "
              f"final loss {summary['final_loss']}")
        print(f"checkpoint: {summary['checkpoint']}")
        print(f"encoder: {encoder}")
    return 0


def _outcome(results: list[Any]) -> tuple[dict[str, Any], Path | None]:
    """The engine's summary and the exported encoder among a pretraining bundle's ``run`` results.

    Raises:
        ValueError: the bundle's run section returned no training summary.
    """
    summary = next((r for r in results if isinstance(r, dict) and "total_steps" in r), None)
    if summary is None:
        raise ValueError("the bundle's run section returned no training summary")
    encoder = next((r for r in results if isinstance(r, Path)), None)
    return summary, encoder
