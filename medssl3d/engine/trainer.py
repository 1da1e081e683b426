"""The pretraining loop shared by every method.

It knows nothing of any specific method: it calls ``method(batch, StepInfo)`` for
``{"loss", "parts"}``, steps AdamW (and the method's auxiliary optimizers), applies the
schedules, updates EMA pairs, and handles AMP, accumulation, clipping, the non-finite-loss
guard, DDP (from torchrun's environment), atomic checkpoints with exact resume, progress and
TensorBoard. Handlers (objects with ``attach(trainer)``, see :mod:`medssl3d.engine.events`) are
called at its events. Build it in Python or from a bundle::

    "trainer": {"_target_": "medssl3d.engine.trainer.Pretrainer", "method": "@method",
                "train_loader": "@train#dataloader", "config": {"lr": 1e-4, "out_dir": "..."},
                "max_epochs": 100, "handlers": []}
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from medssl3d.engine import distributed as dist_utils
from medssl3d.engine.checkpoint import (
    EXPORT_SOURCE_KEY,
    FORMAT_VERSION,
    CheckpointManager,
    check_compatible,
    load_checkpoint,
    rng_state,
    set_rng_state,
)
from medssl3d.engine.config import PRECISIONS, RESUME_AUTO, TrainConfig
from medssl3d.engine.ema import ema_update
from medssl3d.engine.events import Events, Handler
from medssl3d.engine.loader import resumable_loader, to_device
from medssl3d.engine.monitor import TrainingMonitor
from medssl3d.engine.optim import build_adamw, clip_gradients, param_groups, set_lr, set_weight_decay
from medssl3d.engine.sampler import ResumableSampler
from medssl3d.engine.schedules import cosine, warmup_cosine
from medssl3d.methods.base import Auxiliary, SSLMethod, StepInfo

logger = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"
_DTYPES = dict(zip(PRECISIONS, (None, torch.bfloat16, torch.float16), strict=True))
#: Seeds of the per-epoch loader generator are ``seed * _EPOCH_STRIDE + epoch``.
_EPOCH_STRIDE = 100_003


@contextlib.contextmanager
def _frozen(params: list[nn.Parameter]) -> Iterator[None]:
    """Temporarily set requires_grad=False (auxiliary modules during the main loss)."""
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _as_loss_dict(out: Any, where: str) -> dict[str, Any]:
    if isinstance(out, torch.Tensor):
        return {"loss": out, "parts": {}}
    if not isinstance(out, dict) or "loss" not in out:
        raise TypeError(f"{where} must return a scalar Tensor or a dict with 'loss', not {type(out)}")
    return {"loss": out["loss"], "parts": dict(out.get("parts", {}))}


class Pretrainer:
    """Runs a :class:`~medssl3d.methods.base.SSLMethod` to ``max_steps`` / ``max_epochs``.

    Args:
        method: the method to train.
        train_loader: a ``DataLoader`` or a map-style ``Dataset``. A dataset gets a loader with
            ``config.batch_size`` / ``config.num_workers``; a loader whose sampler is not a
            :class:`ResumableSampler` is rebuilt with the same dataset, batch size, workers and
            collate function but a resumable, rank-sharded sampler (shuffled when the original
            was a ``RandomSampler``).
        config: a :class:`TrainConfig` or a dict of its fields (None: defaults + keyword overrides).
        max_epochs: overrides ``config.max_epochs`` (MONAI bundle property ``train#trainer#max_epochs``).
        max_steps: overrides ``config.max_steps``.
        device: training device (default: ``cuda:LOCAL_RANK`` when CUDA is available, else CPU).
        handlers: objects with ``attach(trainer)`` (e.g. :class:`~medssl3d.engine.probe.SegmentationProbe`),
            attached in order; ``None`` entries (disabled bundle components) are skipped.
        run_info: plain-typed facts about the run that outlive it (the encoder's description:
            :func:`medssl3d.transfer.encoder_info.encoder_run_info`), kept in every checkpoint.
        **overrides: any other :class:`TrainConfig` field.

    Raises:
        ValueError: bad configuration, a method without ``name`` / ``backbone_name``, an
            iterable dataset, fp16 on CPU, or a handler without ``attach``.
    """

    def __init__(
        self,
        method: SSLMethod,
        train_loader: DataLoader | Dataset,
        *,
        config: TrainConfig | dict[str, Any] | None = None,
        max_epochs: int | None = None,
        max_steps: int | None = None,
        device: str | torch.device | None = None,
        handlers: Sequence[Handler | None] | None = None,
        run_info: Mapping[str, Any] | None = None,
        **overrides: Any,
    ):
        if max_epochs is not None:
            overrides["max_epochs"] = max_epochs
        if max_steps is not None:
            overrides["max_steps"] = max_steps
        if isinstance(config, TrainConfig):
            base = config.to_dict()
        elif config is None:
            base = {}
        elif isinstance(config, dict):
            base = dict(config)
        else:
            raise ValueError(f"config must be a TrainConfig, a dict or None, got {type(config).__name__}")
        if config is None and "max_steps" not in overrides and "max_epochs" not in overrides:
            raise ValueError("set max_steps or max_epochs")
        self.config = TrainConfig.from_dict({**base, **overrides})
        if not isinstance(method, SSLMethod):
            raise ValueError(f"method must be an SSLMethod, got {type(method).__name__}")
        if not method.name or not method.backbone_name:
            raise ValueError(f"{type(method).__name__} must set `name` and `backbone_name` (for resume)")
        if isinstance(train_loader, IterableDataset) or isinstance(
            getattr(train_loader, "dataset", None), IterableDataset
        ):
            raise ValueError("iterable datasets cannot be resumed exactly; pass a map-style Dataset")
        self.method = method
        self.train_loader = train_loader
        self.run_info = dict(run_info or {})
        if device is None:
            device = f"cuda:{dist_utils.local_rank()}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.config.precision == "fp16" and self.device.type != "cuda":
            raise ValueError(f"precision 'fp16' needs CUDA (device is {self.device}); use 'bf16' or 'fp32'")
        self.out_dir = Path(self.config.out_dir)
        self.checkpoints = CheckpointManager(self.out_dir / CKPT_DIR, keep_every=self.config.keep_every)
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.last_checkpoint: Path | None = None
        self.resumed_from: Path | None = None
        self._prepared = False
        self._owns_process_group = False
        self._event_handlers: dict[Events, list[Callable[[Pretrainer], None]]] = {e: [] for e in Events}
        # The scalars handlers log for the current step; a dict only while ITERATION_COMPLETED runs.
        self._handler_scalars: dict[str, float] | None = None
        for handler in handlers or ():
            if handler is None:
                continue
            if not callable(getattr(handler, "attach", None)):
                raise ValueError(f"handler {handler!r} has no attach(trainer) method")
            handler.attach(self)

    # ------------------------------------------------------------------ handlers
    def add_event_handler(self, event: Events | str, handler: Callable[[Pretrainer], None]) -> None:
        """Call ``handler(self)`` at ``event`` (see :class:`~medssl3d.engine.events.Events`), on every rank.

        Raises:
            ValueError: for an unknown event.
        """
        try:
            event = Events(event)
        except ValueError:
            raise ValueError(f"unknown event {event!r}; expected one of {[e.value for e in Events]}") from None
        self._event_handlers[event].append(handler)

    def _fire(self, event: Events) -> None:
        for handler in self._event_handlers[event]:
            handler(self)

    def log_scalars(self, scalars: Mapping[str, float]) -> None:
        """Add ``scalars`` to the current step's record (TensorBoard and ``metrics.jsonl``, rank 0).

        Call it from an ``ITERATION_COMPLETED`` handler: the step is then recorded even when it is
        not a ``log_every`` step. Names without a "/" are filed under "train/".

        Raises:
            RuntimeError: when called outside an ``ITERATION_COMPLETED`` handler.
        """
        if self._handler_scalars is None:
            raise RuntimeError("log_scalars can only be called from an ITERATION_COMPLETED handler")
        self._handler_scalars.update({str(k): float(v) for k, v in scalars.items()})

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context of ``config.precision`` on the training device (a no-op for fp32)."""
        dtype = _DTYPES[self.config.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    # ------------------------------------------------------------------ set-up
    def prepare(self) -> None:
        """Set up for training: process group, device, loader, optimizers, resume. ``run`` calls it once."""
        cfg = self.config
        self._owns_process_group = dist_utils.init_from_env(self.device.type)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.loader = resumable_loader(self.train_loader, self.config, self.device)
        self.sampler: ResumableSampler = self.loader.sampler
        self.sampler.set_epoch(0)
        self.micro_per_epoch = len(self.loader)
        self.steps_per_epoch = self.micro_per_epoch // cfg.accumulate_steps
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"an epoch has {self.micro_per_epoch} batches per process ({len(self.sampler)} samples, "
                f"batch size {self.loader.batch_size}, drop_last={self.loader.drop_last}), fewer than "
                f"accumulate_steps={cfg.accumulate_steps}: no optimizer step could be taken"
            )
        limits = [cfg.max_steps] if cfg.max_steps else []
        if cfg.max_epochs:
            limits.append(cfg.max_epochs * self.steps_per_epoch)
        self.total_steps = min(limits)
        self.frozen_last_layer_steps = max(
            cfg.freeze_last_layer_steps, cfg.freeze_last_layer_epochs * self.steps_per_epoch
        )
        if cfg.warmup_steps > self.total_steps:
            logger.warning(
                "warmup_steps=%d exceeds the run's %d steps: the learning rate warms up over the whole run "
                "and never decays", cfg.warmup_steps, self.total_steps
            )

        method = self.method.to(self.device)
        method.train()
        if cfg.grad_checkpointing and method.set_grad_checkpointing(True) == 0:
            logger.warning("method %r does not support gradient checkpointing; flag ignored", method.name)
        if cfg.compile_backend and method.compile_backbone(cfg.compile_backend) == 0:
            logger.warning("method %r has no student backbone to compile; compile_backend ignored", method.name)
        self.auxiliaries: list[Auxiliary] = list(method.auxiliary_objectives())
        all_ids = {id(p) for p in method.parameters()}
        names = [a.name for a in self.auxiliaries]
        if len(set(names)) != len(names):
            raise ValueError(f"auxiliary objective names must be unique, got {names}")
        self.aux_params = {
            a.name: [p for p in a.module.parameters() if p.requires_grad] for a in self.auxiliaries
        }
        for name, params in self.aux_params.items():
            if not params or any(id(p) not in all_ids for p in params):
                raise ValueError(f"auxiliary {name!r}: module must be a non-empty submodule of the method")
        aux_flat = [p for ps in self.aux_params.values() for p in ps]

        if dist_utils.is_dist():
            dist_utils.broadcast_module(method)  # the teacher and buffers too, not only the student
            ddp = nn.parallel.DistributedDataParallel(
                method.student,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=cfg.find_unused_parameters,
            )
            method.set_student_runner(ddp)
            self.ddp: nn.parallel.DistributedDataParallel | None = ddp
        else:
            self.ddp = None
        student_ids = {id(p) for p in method.student.parameters()}
        # Trainable parameters DDP does not see: their gradients are averaged by hand.
        self.manual_sync_params = [
            p for p in method.parameters() if p.requires_grad and id(p) not in student_ids
        ]
        self.optimizer = build_adamw(
            param_groups(method, cfg.weight_decay[0], exclude=aux_flat), cfg.lr, betas=cfg.betas
        )
        self.main_params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.aux_optimizers = {a.name: a.make_optimizer(self.aux_params[a.name]) for a in self.auxiliaries}
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self._resume()
        self._prepared = True

    def _resume_path(self) -> Path | None:
        resume = self.config.resume
        if resume is None:
            if self.checkpoints.last.exists():
                logger.warning("resume=None: starting afresh; %s will be overwritten", self.checkpoints.last)
            return None
        if resume == RESUME_AUTO:
            return self.checkpoints.last if self.checkpoints.last.exists() else None
        return Path(resume)

    def _resume(self) -> None:
        cfg = self.config
        path = self._resume_path()
        rank = dist_utils.rank()
        if path is None:
            seed = cfg.seed + rank
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
            return
        ckpt = load_checkpoint(path)  # on CPU; load_state_dict copies to the parameters' device
        check_compatible(ckpt, self.method.name, self.method.backbone_name, path)
        self.method.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        missing = sorted(set(self.aux_optimizers) ^ set(ckpt["auxiliary"]))
        if missing:
            raise ValueError(f"cannot resume from {path}: auxiliary optimizers differ ({missing})")
        for name, opt in self.aux_optimizers.items():
            opt.load_state_dict(ckpt["auxiliary"][name])
        if ckpt["scaler"]:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step = int(ckpt["step"])
        self.epoch = int(ckpt["data_position"]["epoch"])
        self.batch_in_epoch = int(ckpt["data_position"]["batch"])
        states = ckpt["rng"]
        if len(states) == dist_utils.world_size():
            set_rng_state(states[rank])
        else:
            logger.warning("checkpoint holds RNG states of %d processes, this run has %d: reseeding",
                           len(states), dist_utils.world_size())
            torch.manual_seed(cfg.seed + rank + self.step)
        self.resumed_from = self.last_checkpoint = path
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.step, self.epoch,
                    self.batch_in_epoch)

    # ------------------------------------------------------------------ checkpoints
    def _state(self, rng_states: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "method": self.method.name,
            "backbone": self.method.backbone_name,
            "model": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "auxiliary": {name: opt.state_dict() for name, opt in self.aux_optimizers.items()},
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "data_position": {"epoch": self.epoch, "batch": self.batch_in_epoch},
            "rng": rng_states,
            "config": self.config.to_dict(),
            "run_info": self.run_info,
            EXPORT_SOURCE_KEY: self.method.default_export_source(),
            "world_size": dist_utils.world_size(),
        }

    def save_checkpoint(self) -> Path:
        """Write ``out_dir/checkpoints/last.pt`` (rank 0 writes; every rank must call this)."""
        rng_states = dist_utils.all_gather_objects(rng_state())
        path = self.checkpoints.last
        if dist_utils.is_main_process():
            path = self.checkpoints.save(self._state(rng_states), self.step)
        dist_utils.barrier()
        self.last_checkpoint = path
        return path

    # ------------------------------------------------------------------ the step
    def _check_finite(self, loss: torch.Tensor, parts: dict[str, Any], where: str) -> None:
        ok = torch.isfinite(loss.detach()).all().to(torch.int32).reshape(1)
        if int(dist_utils.all_reduce_min(ok).item()) == 1:
            return
        shown = {k: float(torch.as_tensor(v).detach().float().mean()) for k, v in parts.items()}
        last = str(self.last_checkpoint) if self.last_checkpoint else "none written yet"
        raise FloatingPointError(
            f"non-finite loss at step {self.step} ({where}): loss {float(loss.detach().float().mean())}, "
            f"parts {shown}; last good checkpoint: {last}"
        )

    def teacher_start_share(self) -> float | None:
        """The weight the EMA teacher still gives its initial weights: the product of the momenta applied so far.

        After ``step`` updates with momentum ``m(s)``, the teacher is ``Π m(s)`` times its start plus a mix of
        student states. A short run keeps most of the start: DINO's 0.996 → 1 over 200 steps leaves about 0.67.

        Returns:
            ``Π_{s < step} m(s)`` (1.0 before the first step), or ``None`` for a method without a teacher. ``m``
            is the method's :meth:`~medssl3d.methods.base.SSLMethod.teacher_momentum` of the engine's schedule.
        """
        method = self.method
        if method.teacher_momentum(1.0) is None:
            return None
        if self.step == 0:
            return 1.0
        schedule = (cosine(s, self.total_steps, *self.config.ema_momentum) for s in range(self.step))
        return math.prod(method.teacher_momentum(m) for m in schedule)

    def train_step(self, micro_batches: list[Any]) -> tuple[float, dict[str, torch.Tensor]]:
        """One optimizer step over ``micro_batches`` (accumulated), with schedules, clipping and EMA.

        It does not advance ``step`` or log: ``run`` does. Benchmarks call it after :meth:`prepare` to time the
        real engine step.

        Returns:
            The mean loss and the last micro-batch's loss parts.
        """
        cfg, method, s = self.config, self.method, self.step
        lr = warmup_cosine(s, self.total_steps, min(cfg.warmup_steps, self.total_steps), cfg.lr, cfg.min_lr)
        wd = cosine(s, self.total_steps, *cfg.weight_decay)
        momentum = cosine(s, self.total_steps, *cfg.ema_momentum)
        set_lr(self.optimizer, lr)
        set_weight_decay(self.optimizer, wd)
        self.optimizer.zero_grad(set_to_none=True)
        for opt in self.aux_optimizers.values():
            opt.zero_grad(set_to_none=True)
        n = len(micro_batches)
        aux_flat = [p for ps in self.aux_params.values() for p in ps]
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        parts_sum: dict[str, torch.Tensor] = {}

        for i, batch in enumerate(micro_batches):
            info = StepInfo(step=s, total_steps=self.total_steps, epoch=self.epoch, micro_batch=i)
            batch = to_device(batch, self.device)
            no_sync = self.ddp.no_sync() if self.ddp is not None and i < n - 1 else contextlib.nullcontext()
            with no_sync:
                with _frozen(aux_flat), self.autocast():
                    out = method(batch, info)
                if not isinstance(out, dict) or "loss" not in out:
                    raise TypeError(f"{type(method).__name__}.forward must return {{'loss', 'parts'}}")
                loss, parts = out["loss"], dict(out.get("parts", {}))
                self._check_finite(loss, parts, "method loss")
                self.scaler.scale(loss / n).backward()
            loss_sum += loss.detach().double()
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + torch.as_tensor(v).detach().double() / n
            for aux in self.auxiliaries:
                with self.autocast():
                    aux_out = _as_loss_dict(aux.loss(batch, out, info), f"auxiliary {aux.name!r}")
                self._check_finite(aux_out["loss"], aux_out["parts"], f"auxiliary {aux.name!r}")
                self.scaler.scale(aux_out["loss"] / n).backward()
                aux_parts = {"loss": aux_out["loss"], **aux_out["parts"]}
                for k, v in aux_parts.items():
                    key = f"{aux.name}/{k}"
                    parts_sum[key] = parts_sum.get(key, 0.0) + torch.as_tensor(v).detach().double() / n

        dist_utils.all_reduce_grads(self.manual_sync_params)
        if s < self.frozen_last_layer_steps:
            for p in method.last_layer_parameters():
                p.grad = None
        self.scaler.unscale_(self.optimizer)
        grad_norm = clip_gradients(self.main_params, cfg.clip_grad)
        self.scaler.step(self.optimizer)
        for aux in self.auxiliaries:
            opt = self.aux_optimizers[aux.name]
            if aux.clip_grad:
                self.scaler.unscale_(opt)
                clip_gradients(self.aux_params[aux.name], aux.clip_grad)
            self.scaler.step(opt)
        self.scaler.update()
        for student, teacher in method.momentum_pairs():
            ema_update(student, teacher, momentum)

        scalars = {"opt/lr": lr, "opt/weight_decay": wd, "opt/ema_momentum": momentum}
        if grad_norm is not None:
            parts_sum["opt/grad_norm"] = grad_norm.detach().double()
        self._scalars = scalars
        return float(loss_sum / n), parts_sum

    # ------------------------------------------------------------------ the loop
    def _normalise_position(self) -> None:
        if self.micro_per_epoch - self.batch_in_epoch < self.config.accumulate_steps:
            self.epoch += 1
            self.batch_in_epoch = 0

    def run(self, until_step: int | None = None) -> dict[str, Any]:
        """Train to the end of the run (or to ``until_step``), checkpointing on the way and at the end.

        Args:
            until_step: stop after this many optimizer steps in total (schedules still span the
                whole run); the run can then be resumed, in this object or a new process.

        Returns:
            Summary: ``method``, ``backbone``, ``step``, ``total_steps``, ``epoch``, ``start_step``,
            ``final_loss``, ``final_parts``, ``loss_history`` (one float per step taken here),
            ``time_s``, ``steps_per_s``, ``checkpoint``, ``resumed_from``.

        Raises:
            FloatingPointError: the loss became NaN/inf; nothing was stepped and the last checkpoint
                is intact (its path is in the message).
        """
        cfg = self.config
        # Deterministic algorithms are switched on for this call only, not left on for the process.
        previous_deterministic = torch.are_deterministic_algorithms_enabled()
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        try:
            return self._run(until_step)
        finally:
            torch.use_deterministic_algorithms(previous_deterministic)

    def _run(self, until_step: int | None) -> dict[str, Any]:
        if not self._prepared:
            try:
                self.prepare()
            except BaseException:
                self.close()
                raise
        cfg = self.config
        stop = self.total_steps if until_step is None else min(until_step, self.total_steps)
        start_step = self.step
        bs = self.loader.batch_size
        monitor = TrainingMonitor(
            self.out_dir, self.total_steps, start_step,
            enabled=dist_utils.is_main_process(), tensorboard=cfg.tensorboard,
        )
        history: list[float] = []
        final_parts: dict[str, float] = {}
        t0 = time.perf_counter()
        try:
            self._fire(Events.STARTED)
            self._normalise_position()
            while self.step < stop:
                self.sampler.set_epoch(self.epoch)
                self.sampler.set_start(self.batch_in_epoch * bs)
                self.loader.generator.manual_seed(cfg.seed * _EPOCH_STRIDE + self.epoch)
                pending: list[Any] = []
                for batch in self.loader:
                    pending.append(batch)
                    if len(pending) < cfg.accumulate_steps:
                        continue
                    loss, parts = self.train_step(pending)
                    pending = []
                    self.step += 1
                    self.batch_in_epoch += cfg.accumulate_steps
                    self._normalise_position()
                    history.append(loss)
                    monitor.update(self.step, loss)
                    self._handler_scalars = {}
                    try:
                        self._fire(Events.ITERATION_COMPLETED)
                        extra = self._handler_scalars
                    finally:
                        self._handler_scalars = None
                    if extra or self.step % cfg.log_every == 0 or self.step == stop:
                        final_parts = {k: float(v) for k, v in parts.items()}
                        monitor.record(self.step, self.epoch,
                                       {"loss": loss, **final_parts, **self._scalars, **extra},
                                       bs * cfg.accumulate_steps * dist_utils.world_size())
                    if self.step % cfg.ckpt_every == 0 and self.step < stop:
                        self.save_checkpoint()
                    if self.step >= stop or self.batch_in_epoch == 0:
                        break
                else:  # the loader ran out before a full accumulation: the tail is dropped
                    self.epoch += 1
                    self.batch_in_epoch = 0
            if self.step > start_step or self.last_checkpoint is None:
                self.save_checkpoint()
            self._fire(Events.COMPLETED)
        except BaseException:
            self.close()
            raise
        finally:
            monitor.close()
        elapsed = time.perf_counter() - t0
        if self.step >= self.total_steps:
            self.close()
        return {
            "method": self.method.name,
            "backbone": self.method.backbone_name,
            "start_step": start_step,
            "step": self.step,
            "total_steps": self.total_steps,
            "epoch": self.epoch,
            "final_loss": history[-1] if history else None,
            "final_parts": final_parts,
            "loss_history": history,
            "time_s": elapsed,
            "steps_per_s": (self.step - start_step) / elapsed if elapsed > 0 else 0.0,
            "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
            "resumed_from": str(self.resumed_from) if self.resumed_from else None,
        }

    def close(self) -> None:
        """Undo the DDP wrapping and destroy the process group this trainer created.

        Called by :meth:`run` when the run ends or fails; call it after ``run(until_step=...)``
        when the trainer will not be used again.
        """
        self.method.set_student_runner(None)
        self.ddp = None
        if self._owns_process_group:
            torch.distributed.destroy_process_group()
            self._owns_process_group = False
        self._prepared = False


__all__ = ["Events", "Pretrainer", "TrainConfig"]
