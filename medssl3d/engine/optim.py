"""AdamW with weight decay on matrices only, per-step lr / weight-decay setters, gradient clipping."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

DEFAULT_BETAS = (0.9, 0.999)
DEFAULT_EPS = 1e-8
#: Key marking the param groups that receive the scheduled weight decay.
DECAY_KEY = "apply_weight_decay"


def param_groups(
    module: nn.Module, weight_decay: float, *, exclude: Iterable[nn.Parameter] = ()
) -> list[dict]:
    """Split a module's trainable parameters into a decayed and a non-decayed group.

    Biases and every parameter with at most one dimension (norm scales, position scalars,
    learned tokens of shape (C,)) get no weight decay, as in DINO / MAE. Parameters with
    ``requires_grad=False`` (an EMA teacher) and those in ``exclude`` (an auxiliary
    objective's, which has its own optimizer) are left out. Shared parameters appear once.

    Args:
        module: the module whose parameters are optimised.
        weight_decay: initial weight decay of the decayed group.
        exclude: parameters optimised elsewhere.

    Returns:
        Param-group dicts for ``torch.optim``, each with an ``apply_weight_decay`` flag;
        empty groups are dropped.
    """
    skip = {id(p) for p in exclude}
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad or id(p) in skip:
            continue
        skip.add(id(p))
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, DECAY_KEY: True},
        {"params": no_decay, "weight_decay": 0.0, DECAY_KEY: False},
    ]
    return [g for g in groups if g["params"]]


#: Devices with a fused AdamW kernel in PyTorch.
FUSED_DEVICES = ("cpu", "cuda")


def build_adamw(
    groups: list[dict], lr: float, *, betas: tuple[float, float] = DEFAULT_BETAS, eps: float = DEFAULT_EPS
) -> torch.optim.AdamW:
    """AdamW over ``groups`` (from :func:`param_groups`), fused where every parameter allows it.

    PyTorch's fused AdamW (one kernel over all parameters, CPU and CUDA) computes the same update as its default
    per-parameter loop; on a CPU the loop's many small elementwise kernels weighed on short steps (AFiRe, tiny:
    0.186 / 0.203 s against 0.216 / 0.228 s a step, alternating pairs in one process on a quiet machine).

    Raises:
        ValueError: if there is nothing to optimise.
    """
    if not any(g["params"] for g in groups):
        raise ValueError("no trainable parameters: every parameter has requires_grad=False or is excluded")
    params = [p for g in groups for p in g["params"]]
    fused = all(p.is_floating_point() and p.device.type in FUSED_DEVICES for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every param group."""
    for g in optimizer.param_groups:
        g["lr"] = lr


def set_weight_decay(optimizer: torch.optim.Optimizer, weight_decay: float) -> None:
    """Set the weight decay of the groups flagged ``apply_weight_decay``; the others stay at 0."""
    for g in optimizer.param_groups:
        g["weight_decay"] = weight_decay if g.get(DECAY_KEY, True) else 0.0


def clip_gradients(params: Iterable[nn.Parameter], max_norm: float | None) -> torch.Tensor | None:
    """Clip the global gradient norm of ``params`` to ``max_norm``; returns the norm before clipping.

    ``max_norm`` None or <= 0 disables clipping (and returns None).
    """
    params = [p for p in params if p.grad is not None]
    if not max_norm or max_norm <= 0 or not params:
        return None
    return torch.nn.utils.clip_grad_norm_(params, max_norm)
