"""Synthetic phantom cases for a bundle's smoke run, written once into a folder as a Decathlon datalist."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from medssl3d.data.phantoms import make_phantom, write_case

logger = logging.getLogger(__name__)

DATALIST_NAME = "dataset.json"
DEFAULT_SHAPE = (64, 64, 64)
DEFAULT_SPACING = (1.5, 1.5, 1.5)
DEFAULT_N_TRAIN = 2
DEFAULT_N_VAL = 1
DEFAULT_SEED = 0


def write_smoke_datalist(
    root: str | Path,
    *,
    n_train: int = DEFAULT_N_TRAIN,
    n_val: int = DEFAULT_N_VAL,
    shape: Sequence[int] = DEFAULT_SHAPE,
    spacing: Sequence[float] = DEFAULT_SPACING,
    modality: str = "ct",
    seed: int = DEFAULT_SEED,
) -> str:
    """Write labelled phantom cases and ``dataset.json`` under ``root``, or reuse them if already there.

    The folder is filled in a temporary sibling and renamed into place, so concurrent callers (one per
    ``torchrun`` rank) never see half-written cases: the first rename wins and the others reuse it.

    Args:
        root: folder for the cases and the datalist (created; its parent must be writable).
        n_train: cases in the ``training`` split.
        n_val: cases in the ``validation`` split.
        shape: phantom size ``(D, H, W)``.
        spacing: phantom voxel spacing in mm.
        modality: ``"ct"`` or ``"mri"``.
        seed: seed of the first phantom; case ``i`` uses ``seed + i``.

    Returns:
        Path of the Decathlon datalist JSON (image/label paths relative to ``root``).

    Raises:
        ValueError: ``n_train`` < 1 or ``n_val`` < 0.
    """
    if n_train < 1:
        raise ValueError(f"n_train={n_train} must be >= 1")
    if n_val < 0:
        raise ValueError(f"n_val={n_val} must be >= 0")
    root = Path(root)
    datalist_path = root / DATALIST_NAME
    if datalist_path.is_file():
        logger.info("reusing smoke phantoms in %s", root)
        return str(datalist_path)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    cases = []
    for i in range(n_train + n_val):
        phantom = make_phantom(shape=tuple(shape), spacing=tuple(spacing), modality=modality, seed=seed + i)
        files = write_case(staging, f"case{i:03d}", phantom, fmt="nifti", with_label=True)
        cases.append({key: str(Path(value).relative_to(staging)) for key, value in files.items()})
    datalist = {
        "name": "smoke phantoms",
        "modality": modality,
        "labels": {str(k): v for k, v in sorted(phantom.label_names.items())},
        "training": cases[:n_train],
        "validation": cases[n_train:],
    }
    (staging / DATALIST_NAME).write_text(json.dumps(datalist, indent=2))
    try:
        staging.rename(root)
    except OSError:
        # another process renamed its copy into place first (or root exists without a datalist)
        shutil.rmtree(staging, ignore_errors=True)
        if not datalist_path.is_file():
            raise
    logger.info("wrote %d smoke phantoms to %s", len(cases), root)
    return str(datalist_path)
