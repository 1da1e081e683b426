"""The base class every self-supervised method derives from, and the step information it receives.

A method wires a student (backbone + heads), an optional EMA teacher, and losses, and returns
``{"loss": total, "parts": {...}}`` from :meth:`SSLMethod.forward`. It knows nothing of data
loaders, devices, optimizers or files: the engine (``medssl3d.engine``) owns those.
"""

from __future__ import annotations

import abc
import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class StepInfo:
    """Where training stands when the method is called.

    Attributes:
        step: optimizer step about to be taken, counted from 0.
        total_steps: steps of the whole run.
        epoch: current epoch, from 0.
        micro_batch: index of this micro-batch within the optimizer step (0 to ``accumulate_steps - 1``);
            state that must move once per optimizer step (a MoCo key encoder) moves when it is 0.
    """

    step: int
    total_steps: int
    epoch: int
    micro_batch: int = 0

    @property
    def progress(self) -> float:
        """Fraction of the run done, in [0, 1]."""
        if self.total_steps <= 0:
            return 1.0
        return min(max(self.step / self.total_steps, 0.0), 1.0)


@dataclass(frozen=True)
class Auxiliary:
    """A second objective with its own optimizer, e.g. DiRA's GAN discriminator.

    The engine optimises ``module``'s parameters with ``make_optimizer(params)`` after each
    main optimizer step, checkpoints that optimizer and restores it on resume. While the main
    loss is computed and back-propagated, ``module``'s parameters have ``requires_grad=False``,
    so the main loss can run through the module (a generator's adversarial term) without
    writing gradients into it. ``loss`` is then called with the batch and the dict the method's
    ``forward`` returned; it must use detached tensors from that dict (stash them under extra
    keys, e.g. ``"fake"``), since the main graph is already freed.

    Attributes:
        name: unique name, used in logs and in the checkpoint.
        module: a submodule of the method holding the parameters (so they are checkpointed).
        make_optimizer: builds the optimizer from a list of parameters,
            e.g. ``functools.partial(torch.optim.Adam, lr=2e-4, betas=(0.5, 0.999))``.
        loss: ``(batch, outputs, step) -> Tensor`` (scalar) or ``{"loss", "parts"}``.
        clip_grad: gradient-norm clip for this module (None: no clipping).
    """

    name: str
    module: nn.Module
    make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer]
    loss: Callable[[dict, dict, StepInfo], Any]
    clip_grad: float | None = None


def make_teacher(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` in eval mode whose parameters never require gradients.

    ``SSLMethod.train()`` keeps the ``teacher`` attribute in eval mode, so dropout is off and
    BatchNorm uses the running statistics copied from the student by the EMA update.
    """
    teacher = copy.deepcopy(module)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


class SSLMethod(nn.Module, abc.ABC):
    """Base of every pretraining method.

    Subclasses set ``name`` and ``backbone_name`` (checked when resuming), build ``self.student``
    (backbone under ``self.student.backbone``, plus heads) and, if they distil, ``self.teacher``
    with :func:`make_teacher`. All trainable parameters except auxiliary objectives' belong in
    ``student``. Under DDP the engine wraps the student; call it through :meth:`run_student` so
    gradients are synchronised (a direct ``self.student(...)`` works in one process only).

    Attributes:
        name: method name, e.g. "alice".
        backbone_name: backbone name, e.g. "swin-tiny".
        student: the trained network.
        teacher: its EMA copy, or None.
    """

    name: str = ""
    backbone_name: str = ""
    teacher: nn.Module | None

    def __init__(self) -> None:
        super().__init__()
        self.teacher = None
        # The DDP wrapper, when set by the engine; kept out of the module tree so that state
        # dict keys stay the same with and without DDP.
        object.__setattr__(self, "_student_runner", None)

    def run_student(self, *args: Any, **kwargs: Any) -> Any:
        """Call the student (through its DDP wrapper when the engine set one)."""
        runner = self._student_runner
        return (runner or self.student)(*args, **kwargs)

    def set_student_runner(self, runner: nn.Module | None) -> None:
        """Route :meth:`run_student` through ``runner`` (the engine's DDP wrapper); None undoes it."""
        object.__setattr__(self, "_student_runner", runner)

    @abc.abstractmethod
    def forward(self, batch: dict[str, Any], step: StepInfo) -> dict[str, Any]:
        """Compute the training loss for one batch.

        Args:
            batch: the collated batch (tensors on the training device), e.g. ``{"image": (B, 1, D, H, W)}``.
            step: where training stands (for temperature or loss-weight schedules).

        Returns:
            ``{"loss": scalar Tensor, "parts": {name: scalar Tensor}}``; extra keys are allowed
            and are passed to auxiliary objectives.
        """

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """``(student, teacher)`` module pairs the engine updates by EMA after each step.

        Default: ``[(self.student, self.teacher)]`` when a teacher exists.
        """
        return [] if self.teacher is None else [(self.student, self.teacher)]

    def teacher_momentum(self, engine_momentum: float) -> float | None:
        """The momentum the teacher moves with at a step where the engine's EMA momentum is ``engine_momentum``.

        Default: the engine's, where the engine updates a teacher (:meth:`momentum_pairs`); ``None`` without one.
        """
        return engine_momentum if self.momentum_pairs() else None

    def auxiliary_objectives(self) -> list[Auxiliary]:
        """Objectives with their own optimizer (none by default); called once by the engine."""
        return []

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """Parameters kept frozen during the engine's last-layer freeze (DINO's last layer).

        The freeze lasts ``freeze_last_layer_steps`` optimizer steps or ``freeze_last_layer_epochs`` epochs,
        whichever is longer; an epoch is counted per process, so it is one epoch whatever the world size.
        """
        return []

    def set_grad_checkpointing(self, enabled: bool = True) -> int:
        """Switch activation checkpointing in the student's blocks that support it.

        Sets ``use_checkpoint`` on every student submodule that has that attribute (MONAI's
        Swin blocks). Methods with other mechanisms override this.

        Returns:
            Number of submodules switched (0: the method does not support it).
        """
        count = 0
        for m in self.student.modules():
            if hasattr(m, "use_checkpoint"):
                m.use_checkpoint = enabled
                count += 1
        return count

    def compile_backbone(self, backend: str) -> int:
        """``torch.compile`` the student's backbone in place (its state-dict keys stay as they are).

        Args:
            backend: a ``torch.compile`` backend (``"inductor"``: generated kernels; ``"eager"``: tracing only).

        Returns:
            Number of modules compiled (0: the student has no ``backbone``).
        """
        backbone = getattr(self.student, "backbone", None)
        if not isinstance(backbone, nn.Module):
            return 0
        backbone.compile(backend=backend)
        return 1

    def export_state_dict(self, target: str, source: str = "student") -> dict[str, torch.Tensor]:
        """The backbone's weights keyed for MONAI ``target`` ("swinunetr" or "unetr").

        Args:
            target: ``"swinunetr"`` or ``"unetr"``.
            source: ``"student"``, or ``"teacher"`` for the EMA teacher's backbone (methods with one).

        Raises:
            ValueError: an unknown ``source``, or a network without a ``backbone`` to export.
        """
        if source not in ("student", "teacher"):
            raise ValueError(f"export source must be 'student' or 'teacher', got {source!r}")
        network = self.student if source == "student" else self.teacher
        backbone = getattr(network, "backbone", None)
        if backbone is None or not hasattr(backbone, "export_state_dict"):
            raise ValueError(f"method {self.name!r}: the {source} has no backbone with export_state_dict()")
        return backbone.export_state_dict(target)

    def default_export_source(self) -> str:
        """Which backbone an export hands over by default.

        Returns:
            ``"teacher"`` where the method keeps an EMA teacher backbone (what the online probe scores), else
            ``"student"``.
        """
        return "teacher" if hasattr(getattr(self, "teacher", None), "backbone") else "student"

    def train(self, mode: bool = True) -> SSLMethod:
        """Set training mode, keeping the teacher in eval mode."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self
