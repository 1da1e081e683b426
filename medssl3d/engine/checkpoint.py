"""Atomic training checkpoints that load with ``torch.load(weights_only=True)``.

A checkpoint is a plain dict (see :data:`CHECKPOINT_KEYS`); random-number-generator states
are stored as tensors, lists and ints only, so that the safe unpickler accepts them.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medssl3d.data.atomic_files import atomic_open, atomic_torch_save, remove_stale_temporaries

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
#: The key naming what the checkpoint's method exports by default (``"student"`` / ``"teacher"``).
EXPORT_SOURCE_KEY = "export_source"
LAST_NAME = "last.pt"
STEP_NAME = "step_{step:08d}.pt"
#: Keys every checkpoint written by the engine holds.
CHECKPOINT_KEYS = (
    "format_version", "method", "backbone", "model", "optimizer", "auxiliary", "scaler",
    "step", "epoch", "data_position", "rng", "config",
)


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically: temp file in the same folder, fsync, ``os.replace``.

    A crash or an exception at any point leaves the previous file at ``path`` untouched and
    removes the temporary file.

    Returns:
        The path written.
    """
    return atomic_torch_save(state, path, durable=True)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(weights_only=True)``.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file is not a readable engine checkpoint (names the path and why).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, foreign pickle, ...
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: not a medssl3d training checkpoint (format_version {FORMAT_VERSION} expected)"
        )
    return ckpt


def check_compatible(
    ckpt: dict[str, Any], method_name: str, backbone_name: str, path: str | os.PathLike
) -> None:
    """Refuse to resume ``method_name`` on ``backbone_name`` from a checkpoint of something else.

    Raises:
        ValueError: naming the checkpoint, what it holds, what this run trains, and why it cannot load.
    """
    if ckpt.get("method") != method_name:
        raise ValueError(
            f"cannot resume from {path}: it was written by method {ckpt.get('method')!r} but this run "
            f"trains method {method_name!r}; a checkpoint only resumes the same method, whose model "
            "state and optimizer it holds (use a fresh out_dir or resume=None to start over)"
        )
    if ckpt.get("backbone") != backbone_name:
        raise ValueError(
            f"cannot resume from {path}: it was written with backbone {ckpt.get('backbone')!r} but this "
            f"run uses backbone {backbone_name!r}; the weights have different shapes and names "
            "(use a fresh out_dir or resume=None to start over)"
        )


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA when available) RNG states as weights_only-safe values."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss),
                  float(np_gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states returned by :func:`rng_state`."""
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.cpu().numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])
        else:
            logger.warning("checkpoint has %d CUDA RNG states for %d devices; not restored",
                           len(cuda_states), torch.cuda.device_count())


class CheckpointManager:
    """Keeps ``<folder>/last.pt`` and, optionally, ``step_XXXXXXXX.pt`` every ``keep_every`` steps.

    Args:
        folder: where checkpoints live.
        keep_every: also keep a permanent copy at steps that are multiples of this (None: never).
    """

    def __init__(self, folder: str | os.PathLike, keep_every: int | None = None):
        if keep_every is not None and keep_every < 1:
            raise ValueError(f"keep_every must be >= 1 or None, got {keep_every}")
        self.folder = Path(folder)
        self.keep_every = keep_every

    @property
    def last(self) -> Path:
        """Path of the most recent checkpoint."""
        return self.folder / LAST_NAME

    def save(self, state: dict[str, Any], step: int) -> Path:
        """Write ``state`` as the last checkpoint (and a kept copy when ``step`` is due)."""
        path = save_checkpoint(state, self.last)
        # temporaries of a writer killed mid-save (SIGKILL skips its clean-up); one writer per folder
        remove_stale_temporaries(path)
        if self.keep_every and step % self.keep_every == 0:
            with open(path, "rb") as src, atomic_open(self.folder / STEP_NAME.format(step=step)) as dst:
                shutil.copyfileobj(src, dst)
        logger.info("checkpoint at step %d: %s", step, path)
        return path
