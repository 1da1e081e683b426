"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every file medssl3d writes that a later run reads back (checkpoints, exported encoders, caches,
datalists, manifests, benchmark records) goes through :func:`atomic_open`: the content is written to a
temporary file in the same folder, which then replaces the target with ``os.replace`` (atomic on POSIX
and Windows within one file system). An exception, or a crash, leaves the previous file untouched; a
process killed before its clean-up leaves a temporary named ``.<name>.<pid>.<random>.tmp``, which
:func:`remove_stale_temporaries` deletes.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch

__all__ = [
    "atomic_open", "atomic_torch_save", "atomic_write_bytes", "atomic_write_json", "remove_stale_temporaries",
]

#: Mode of new files before the umask: the same as ``open(path, "w")`` (``mkstemp`` would make a shared
#: cache private to whoever created it).
NEW_FILE_MODE = 0o666
JSON_INDENT = 2


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def _fsync_dir(folder: Path) -> None:
    # Makes the rename durable on POSIX; not every platform can open a directory.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", *, durable: bool = False) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; it becomes ``path`` when the block ends cleanly.

    Args:
        path: the file to (re)write; its parent folders are created.
        mode: ``"wb"`` or ``"w"`` (text, UTF-8).
        durable: flush and fsync the file and its folder, so that the new content survives a power cut
            (checkpoints, datalists); caches that can be recomputed skip the cost.

    Raises:
        ValueError: a mode other than ``"wb"`` or ``"w"``.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, NEW_FILE_MODE)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, durable: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_open`); returns the path."""
    with atomic_open(path, "wb", durable=durable) as f:
        f.write(data)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, durable: bool = True, sort_keys: bool = False) -> Path:
    """Write ``obj`` as indented JSON (with a final newline) atomically; returns the path."""
    return atomic_write_bytes(
        path, (json.dumps(obj, indent=JSON_INDENT, sort_keys=sort_keys) + "\n").encode("utf-8"), durable=durable
    )


def atomic_torch_save(obj: Any, path: str | os.PathLike, *, durable: bool = False) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (:func:`atomic_open`); returns the path."""
    with atomic_open(path, "wb", durable=durable) as f:
        torch.save(obj, f)
    return Path(path)


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temporaries a killed writer of ``path`` left behind; returns what was deleted.

    Only for a file with one writer at a time (a run's checkpoint): another live writer's temporary
    would be deleted too.
    """
    path = Path(path)
    stale = sorted(path.parent.glob(f".{path.name}.*.tmp"))
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale
