"""The transfer benchmark's figure: test Dice against the number of labelled units k, one line per method.

Top row: mean test Dice (error bars: sd over seeds) per task. Bottom row: the paired difference of each
pretrained method to the scratch run of its own network (same seeds), the benchmark's answer to "how much
does pretraining buy with k labels".
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

SUBPLOT_SIZE_IN = (4.6, 3.6)
DPI = 110
CAPSIZE = 3
DICE_LIMITS = (0.0, 1.0)
#: Horizontal offset between methods at one k, in log2 units, so that their error bars do not overlap.
DODGE_LOG2 = 0.04


def _dodged(ks: Sequence[int], index: int, count: int) -> list[float]:
    return [k * 2 ** (DODGE_LOG2 * (index - (count - 1) / 2)) for k in ks]


def plot_transfer(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, *,
                  references: Collection[str] = ("scratch",), baseline: str | None = None) -> Path:
    """Write a PNG: per task, Dice against k (top) and the paired difference to scratch against k (bottom).

    Args:
        rows: aggregated rows (``task``, ``method``, ``k``, ``unit``, ``dice``, optional ``dice_sd``, ``diff``,
            ``diff_sd``) as :func:`medssl3d.bench.transfer.aggregate` gives them.
        path: the PNG to write.
        references: methods drawn dashed (training from scratch); they have no difference line.
        baseline: a method to mark "(baseline)" in the legend.

    Returns:
        ``path``.

    Raises:
        ValueError: ``rows`` is empty.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("no aggregated rows to plot")
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(2, len(tasks), figsize=(SUBPLOT_SIZE_IN[0] * len(tasks), 2 * SUBPLOT_SIZE_IN[1]),
                             squeeze=False, sharex="col")
    for column, task in enumerate(tasks):
        top, bottom = axes[0][column], axes[1][column]
        task_rows = [r for r in rows if r["task"] == task]
        methods = list(dict.fromkeys(r["method"] for r in task_rows))
        colours = {m: f"C{i}" for i, m in enumerate(methods)}
        for i, method in enumerate(methods):
            line = sorted((r for r in task_rows if r["method"] == method), key=lambda r: r["k"])
            ks = _dodged([r["k"] for r in line], i, len(methods))
            label = f"{method} (baseline)" if method == baseline else method
            top.errorbar(ks, [r["dice"] for r in line], yerr=[r.get("dice_sd", 0.0) for r in line], marker="o",
                         capsize=CAPSIZE, color=colours[method], linestyle="--" if method in references else "-",
                         label=label)
            paired = [r for r in line if "diff" in r]
            if method not in references and paired:
                bottom.errorbar(_dodged([r["k"] for r in paired], i, len(methods)), [r["diff"] for r in paired],
                                yerr=[r.get("diff_sd", 0.0) for r in paired], marker="o", capsize=CAPSIZE,
                                color=colours[method], label=f"{label} − {paired[0]['reference']}")
        ks = sorted({r["k"] for r in task_rows})
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.set_xticks(ks, [str(k) for k in ks])
            ax.grid(alpha=0.3)
        top.set_ylim(*DICE_LIMITS)
        top.set_ylabel("test Dice (mean over classes)")
        top.set_title(task)
        top.legend(fontsize="small")
        bottom.axhline(0.0, color="black", linewidth=0.8)
        bottom.set_xlabel(f"labelled {task_rows[0]['unit']}s (k)")
        bottom.set_ylabel("Δ Dice vs scratch (paired by seed)")
        if bottom.get_legend_handles_labels()[0]:
            bottom.legend(fontsize="small")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_budget_curve(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, *,
                      references: Collection[str] = ("scratch",), baseline: str | None = None) -> Path:
    """Write a PNG: per task, test Dice against fine-tuning steps (one k), one line per method, sd bars.

    It shows how much sooner a pretrained start reaches a Dice than scratch does: each point is a run of that
    length (its learning-rate schedule fitted to it), not a snapshot of a longer run.

    Args:
        rows: aggregated rows of one k (``task``, ``method``, ``steps``, ``dice``, optional ``dice_sd``).
        path: the PNG to write.
        references: methods drawn dashed (training from scratch).
        baseline: a method to mark "(baseline)" in the legend.

    Returns:
        ``path``.

    Raises:
        ValueError: ``rows`` is empty or mixes several k.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("no aggregated rows to plot")
    ks = {r["k"] for r in rows}
    if len(ks) != 1:
        raise ValueError(f"a budget curve is drawn for one k, got {sorted(ks)}")
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(SUBPLOT_SIZE_IN[0] * len(tasks), SUBPLOT_SIZE_IN[1]),
                             squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        task_rows = [r for r in rows if r["task"] == task]
        methods = list(dict.fromkeys(r["method"] for r in task_rows))
        for i, method in enumerate(methods):
            line = sorted((r for r in task_rows if r["method"] == method), key=lambda r: r["steps"])
            ax.errorbar(_dodged([r["steps"] for r in line], i, len(methods)), [r["dice"] for r in line],
                        yerr=[r.get("dice_sd", 0.0) for r in line], marker="o", capsize=CAPSIZE, color=f"C{i}",
                        linestyle="--" if method in references else "-",
                        label=f"{method} (baseline)" if method == baseline else method)
        steps = sorted({r["steps"] for r in task_rows})
        ax.set_xscale("log", base=2)
        ax.set_xticks(steps, [str(s) for s in steps])
        ax.set_ylim(*DICE_LIMITS)
        ax.grid(alpha=0.3)
        ax.set_xlabel(f"fine-tuning steps (k = {next(iter(ks))} {task_rows[0]['unit']})")
        ax.set_ylabel("test Dice (mean over classes)")
        ax.set_title(task)
        ax.legend(fontsize="small")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
