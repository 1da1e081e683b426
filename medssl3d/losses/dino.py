"""DINO distillation cross-entropy with a centred, sharpened teacher (``docs/methods.md``, shared pieces)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medssl3d.engine.distributed import all_reduce_mean

__all__ = ["DEFAULT_CENTER_MOMENTUM", "DEFAULT_STUDENT_TEMP", "DEFAULT_TEACHER_TEMP", "DINOLoss"]

DEFAULT_STUDENT_TEMP = 0.1
DEFAULT_TEACHER_TEMP = 0.04
DEFAULT_CENTER_MOMENTUM = 0.9


class DINOLoss(nn.Module):
    """``H(t, s) = -Σ_k softmax((t - c) / τt)_k · log softmax(s / τs)_k``, averaged over rows and view pairs.

    Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021. Each argument
    is a list of views; the loss averages ``H`` over every (teacher view ``i``, student view ``j``) pair,
    skipping ``i == j`` when ``cross_views`` (the views then must correspond one to one: same crop in
    the same position of both lists). Rows are all leading dimensions, so ``(B, K)`` images and
    ``(B, N, K)`` tokens both work. In training mode the centre ``c`` (a buffer, so it is checkpointed)
    moves after each call: ``c ← m·c + (1 − m)·mean(t)`` over all rows of all teacher views, averaged
    across processes with :func:`medssl3d.engine.distributed.all_reduce_mean` (a no-op in one process).
    Softmaxes run in float32 whatever the logits' dtype (a sharp ``τt`` magnifies bf16 rounding).

    Args:
        out_dim: prototypes ``K``.
        student_temp: ``τs``.
        center_momentum: ``m``.
        cross_views: skip pairs of a view with itself.

    Raises:
        ValueError: a non-positive temperature or a momentum outside [0, 1].
    """

    center: Tensor

    def __init__(
        self,
        out_dim: int,
        student_temp: float = DEFAULT_STUDENT_TEMP,
        center_momentum: float = DEFAULT_CENTER_MOMENTUM,
        cross_views: bool = True,
    ) -> None:
        super().__init__()
        if student_temp <= 0:
            raise ValueError(f"student_temp must be > 0, got {student_temp}")
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"center_momentum must be in [0, 1], got {center_momentum}")
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.cross_views = cross_views
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(
        self,
        student: Sequence[Tensor] | Tensor,
        teacher: Sequence[Tensor] | Tensor,
        teacher_temp: float = DEFAULT_TEACHER_TEMP,
        update_center: bool = True,
    ) -> Tensor:
        """Compute the loss (and, in training mode, move the centre).

        Args:
            student: student logits per view, each ``(..., K)``.
            teacher: teacher logits per view, each ``(..., K)`` (detached inside).
            teacher_temp: ``τt`` (> 0), e.g. from a warm-up schedule.
            update_center: move the centre after the loss (training mode only); False keeps it, e.g. on
                every micro-batch of an accumulated step but the first, so that it moves once per step.

        Returns:
            The scalar loss.

        Raises:
            ValueError: no view pair to compare, mismatched widths, or a non-positive ``teacher_temp``.
        """
        student = [student] if isinstance(student, Tensor) else list(student)
        teacher = [teacher] if isinstance(teacher, Tensor) else list(teacher)
        if teacher_temp <= 0:
            raise ValueError(f"teacher_temp must be > 0, got {teacher_temp}")
        width = self.center.shape[1]
        if any(v.shape[-1] != width for v in [*student, *teacher]):
            raise ValueError(f"DINOLoss expects logits (..., {width})")
        pairs = [(i, j) for i in range(len(teacher)) for j in range(len(student)) if not (self.cross_views and i == j)]
        if not pairs:
            raise ValueError(f"no view pairs: {len(teacher)} teacher and {len(student)} student view(s)")
        teacher = [t.detach().float() for t in teacher]
        targets = [F.softmax((t - self.center) / teacher_temp, dim=-1) for t in teacher]
        log_probs = [F.log_softmax(s.float() / self.student_temp, dim=-1) for s in student]
        total = sum(-(targets[i] * log_probs[j]).sum(dim=-1).mean() for i, j in pairs)
        if self.training and update_center:
            self.update_center(teacher)
        return total / len(pairs)

    @torch.no_grad()
    def update_center(self, teacher: Sequence[Tensor]) -> None:
        """``c ← m·c + (1 − m)·mean(t)`` over every row of every view, averaged across processes."""
        rows = torch.cat([t.reshape(-1, t.shape[-1]) for t in teacher]).float()
        batch_center = all_reduce_mean(rows.mean(dim=0, keepdim=True))
        self.center.mul_(self.center_momentum).add_(batch_center.to(self.center.dtype), alpha=1 - self.center_momentum)
