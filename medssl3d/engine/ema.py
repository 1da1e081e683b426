"""Exponential moving average of a student into its teacher (the EMA teacher of docs/methods.md, "Shared pieces")."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update(student: nn.Module, teacher: nn.Module, m: float) -> None:
    """Move every teacher parameter to ``m * teacher + (1 - m) * student``; copy the buffers.

    Runs under ``torch.no_grad`` with ``torch._foreach`` kernels, so the update neither builds an
    autograd graph nor gives the teacher gradients. Buffers (BatchNorm statistics, counters)
    are copied from the student because averaging them has no meaning for integer buffers and
    little for running statistics.

    Args:
        student: the trained module.
        teacher: a module with the same parameter and buffer names (usually a deep copy).
        m: momentum in [0, 1]; 1 leaves the teacher unchanged, 0 copies the student.

    Raises:
        ValueError: if ``m`` is outside [0, 1] or the two modules' names differ.
    """
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {m}")
    s_params = dict(student.named_parameters())
    t_params = dict(teacher.named_parameters())
    if s_params.keys() != t_params.keys():
        diff = sorted(set(s_params) ^ set(t_params))
        raise ValueError(f"student and teacher parameters differ, e.g. {diff[:3]}")
    names = list(t_params)
    if names:
        t_list = [t_params[n] for n in names]
        s_list = [s_params[n].detach() for n in names]
        torch._foreach_mul_(t_list, m)
        torch._foreach_add_(t_list, s_list, alpha=1.0 - m)
    s_bufs = dict(student.named_buffers())
    for name, buf in teacher.named_buffers():
        if name not in s_bufs:
            raise ValueError(f"teacher buffer {name!r} has no student counterpart")
        buf.copy_(s_bufs[name])
