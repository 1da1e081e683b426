"""What every benchmark writes: a JSON record (machine, versions, suite, every figure) and a printed table.

Records are meant to be compared across runs and machines, so each one carries the facts that move
timings: the host's CPU and core count, the accelerator, the thread count and the library versions.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from medssl3d import __version__
from medssl3d.data.sample import atomic_write_json

DEFAULT_OUTPUT_DIR = Path("outputs/bench")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def machine_info() -> dict[str, Any]:
    """The facts about this machine and software that a timing depends on."""
    import monai

    info: dict[str, Any] = {
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "numpy": np.__version__,
        "medssl3d": __version__,
        "commit": _git_commit(),
        "gpu": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {
            "name": props.name, "memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda
        }
    return info


def default_output(kind: str, suite: str) -> Path:
    """``outputs/bench/<kind>-<suite>-<UTC time>.json``: one record per run, never overwritten."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return DEFAULT_OUTPUT_DIR / f"{kind}-{suite}-{stamp}.json"


def write_record(
    path: str | os.PathLike, kind: str, suite: str, config: Mapping[str, Any], results: Sequence[Mapping[str, Any]]
) -> Path:
    """Write one benchmark record atomically.

    Args:
        path: the JSON file to write (its folder is created).
        kind: "step", "data" or "transfer".
        suite: the suite name (e.g. "smoke") or the YAML it came from.
        config: the resolved suite config, so the run can be repeated.
        results: one mapping of figures per row of the printed table.

    Returns:
        The path written.
    """
    record = {
        "kind": kind,
        "suite": suite,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "config": dict(config),
        "results": [dict(r) for r in results],
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_json(path, record)


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    try:
        return format(value, fmt)
    except (TypeError, ValueError):
        return str(value)


def format_table(rows: Iterable[Mapping[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A Markdown table of ``rows``; ``columns`` holds ``(key, header, format spec)`` triples."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(k), f) for k, _, f in columns) + " |")
    return "\n".join(lines)
