"""Pure schedule functions of the step: learning rate, weight decay, EMA momentum, temperatures.

Nothing here is precomputed from a data loader's length; callers pass the step and the total,
so a resumed run evaluates exactly the same values as an uninterrupted one.
"""

from __future__ import annotations

import math


def _check_step(step: int, total: int) -> None:
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")


def cosine(step: int, total: int, start: float, end: float) -> float:
    """Half-cosine from ``start`` at step 0 to ``end`` at ``total`` (and after).

    Used for the learning-rate decay, the weight decay (0.04 → 0.4) and the EMA momentum
    (0.996 → 1.0).

    Args:
        step: current step, >= 0.
        total: steps over which the value travels; ``total == 0`` gives ``end``.
        start: value at step 0.
        end: value at ``total``.

    Returns:
        ``end + (start - end) * (1 + cos(pi * step / total)) / 2``, clamped to ``end`` past ``total``.
    """
    _check_step(step, total)
    if total == 0 or step >= total:
        return float(end)
    return float(end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * step / total)))


def linear(step: int, total: int, start: float, end: float) -> float:
    """Straight line from ``start`` at step 0 to ``end`` at ``total``, then constant ``end``.

    Args:
        step: current step, >= 0.
        total: steps over which the value travels; ``total == 0`` gives ``end``.
        start: value at step 0.
        end: value at ``total``.
    """
    _check_step(step, total)
    if total == 0 or step >= total:
        return float(end)
    return float(start + (end - start) * step / total)


def linear_warmup(step: int, warmup: int, start: float, end: float) -> float:
    """Linear warm-up from ``start`` to ``end`` over ``warmup`` steps, then constant.

    The teacher-temperature helper: DINO's τt warms from 0.04 to 0.07 over the first epochs,
    e.g. ``linear_warmup(step, 30 * steps_per_epoch, 0.04, 0.07)``.

    Args:
        step: current step, >= 0.
        warmup: length of the warm-up in steps; 0 gives ``end`` from the first step.
        start: value at step 0.
        end: value from step ``warmup`` on.
    """
    return linear(step, warmup, start, end)


def warmup_cosine(
    step: int, total: int, warmup: int, base: float, final: float, warmup_start: float = 0.0
) -> float:
    """Linear warm-up from ``warmup_start`` to ``base`` over ``warmup`` steps, then cosine to ``final``.

    The learning-rate schedule of §0: at step ``warmup`` the value is ``base``; at ``total`` it is
    ``final``.

    Args:
        step: current step, >= 0.
        total: length of the run in steps (warm-up included).
        warmup: warm-up steps, ``0 <= warmup <= total``.
        base: peak value reached at the end of the warm-up.
        final: value at ``total`` and after.
        warmup_start: value at step 0 of the warm-up.

    Raises:
        ValueError: if ``warmup`` is negative or longer than ``total``.
    """
    _check_step(step, total)
    if not 0 <= warmup <= total:
        raise ValueError(f"warmup must be in [0, total={total}], got {warmup}")
    if step < warmup:
        return linear(step, warmup, warmup_start, base)
    return cosine(step - warmup, total - warmup, base, final)
