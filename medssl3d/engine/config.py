"""The pretraining engine's configuration (one frozen dataclass; bundles pass it as a dict)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

PRECISIONS = ("fp32", "bf16", "fp16")
RESUME_AUTO = "auto"


@dataclass(frozen=True)
class TrainConfig:
    """Everything the engine needs to run a method; no method-specific numbers.

    Attributes:
        max_steps: optimizer steps of the run (with ``max_epochs`` too, the smaller wins).
        max_epochs: epochs of the run (an epoch is one pass of the loader).
        batch_size: per-process batch size when the engine builds the loader from a dataset.
        num_workers: loader workers when the engine builds the loader from a dataset.
        drop_last: drop an epoch's last incomplete batch when the engine builds the loader (a batch of
            one leaves batch-contrastive losses without negatives).
        lr: peak learning rate, reached after the warm-up.
        min_lr: learning rate at the end of the cosine decay.
        warmup_steps: linear learning-rate warm-up from 0.
        weight_decay: (start, end) of the cosine weight-decay schedule.
        betas: AdamW betas.
        clip_grad: global gradient-norm clip (None or 0: off).
        ema_momentum: (start, end) of the cosine EMA-momentum schedule.
        precision: "fp32", "bf16" (CUDA or CPU) or "fp16" (CUDA, with a gradient scaler).
        accumulate_steps: micro-batches per optimizer step.
        grad_checkpointing: ask the method to checkpoint activations.
        ckpt_every: steps between checkpoints (one is always written at the end).
        keep_every: also keep ``step_XXXXXXXX.pt`` every this many steps (None: only ``last.pt``).
        log_every: steps between log lines and scalar records.
        out_dir: run folder (``checkpoints/``, ``tb/``, ``metrics.jsonl``).
        seed: seed of the RNGs and the sample order.
        deterministic: use deterministic algorithms (``torch.use_deterministic_algorithms``).
        resume: "auto" (``out_dir/checkpoints/last.pt`` if present), a checkpoint path, or None.
        freeze_last_layer_steps: steps during which ``method.last_layer_parameters()`` are not updated.
        freeze_last_layer_epochs: epochs during which they are not updated (an epoch of optimizer steps of one
            process, so one epoch whatever the number of processes); the longer of the two freezes wins.
        find_unused_parameters: passed to DDP.
        compile_backend: ``torch.compile`` the student's backbone with this backend (``"inductor"``); None: plain
            PyTorch. The first steps pay the compilation (``medssl3d bench step compile_backend=inductor`` reports
            it beside the step time).
        tensorboard: write TensorBoard event files.
        seed_transforms: reseed the dataset's random transform per (seed, epoch, index), so
            augmentation is reproduced exactly on resume; applies when the engine builds the loader.
    """

    max_steps: int | None = None
    max_epochs: int | None = None
    batch_size: int = 2
    num_workers: int = 0
    drop_last: bool = True
    lr: float = 1e-4
    min_lr: float = 1e-6
    warmup_steps: int = 0
    weight_decay: tuple[float, float] = (0.04, 0.4)
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float | None = 3.0
    ema_momentum: tuple[float, float] = (0.996, 1.0)
    precision: str = "fp32"
    accumulate_steps: int = 1
    grad_checkpointing: bool = False
    ckpt_every: int = 1000
    keep_every: int | None = None
    log_every: int = 10
    out_dir: str = "runs/pretrain"
    seed: int = 0
    deterministic: bool = False
    resume: str | None = RESUME_AUTO
    freeze_last_layer_steps: int = 0
    freeze_last_layer_epochs: int = 0
    find_unused_parameters: bool = False
    compile_backend: str | None = None
    tensorboard: bool = True
    seed_transforms: bool = True

    def __post_init__(self) -> None:
        # JSON / YAML give lists and paths; store tuples and strings so the config stays hashable
        # and serialises into a checkpoint that loads with weights_only=True.
        for name in ("weight_decay", "betas", "ema_momentum"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 2:
                raise ValueError(f"{name} must be a (start, end) pair, got {getattr(self, name)!r}")
            object.__setattr__(self, name, value)
        object.__setattr__(self, "out_dir", str(self.out_dir))
        if self.resume is not None:
            object.__setattr__(self, "resume", str(self.resume))
        if self.compile_backend is not None and not (isinstance(self.compile_backend, str) and self.compile_backend):
            raise ValueError(f"compile_backend must be a torch.compile backend or None, got {self.compile_backend!r}")
        if self.max_steps is None and self.max_epochs is None:
            raise ValueError("set max_steps or max_epochs (both None)")
        for name in ("max_steps", "max_epochs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name in ("batch_size", "accumulate_steps", "ckpt_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_workers", "warmup_steps", "freeze_last_layer_steps", "freeze_last_layer_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.lr <= 0 or self.min_lr < 0:
            raise ValueError(f"lr must be > 0 and min_lr >= 0, got lr={self.lr}, min_lr={self.min_lr}")
        if not all(0.0 <= m <= 1.0 for m in self.ema_momentum):
            raise ValueError(f"ema_momentum values must be in [0, 1], got {self.ema_momentum}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a plain dict (a bundle's JSON), refusing unknown keys.

        Raises:
            ValueError: naming the unknown keys.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig keys {unknown}; known: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain-type dict (for checkpoints and logs)."""
        return dataclasses.asdict(self)


def config_defaults() -> dict[str, Any]:
    """Every :class:`TrainConfig` setting with its default: what a bundle's ``train#trainer#config`` leaves out.

    The dataclass is the one source of these values; a bundle names only the settings it changes.
    """
    return {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
