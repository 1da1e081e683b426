"""``medssl3d predict RUN INPUT... -o DIR``: label maps of a fine-tuned run, each on its input's grid.

The job runs the segmentation bundle's ``inference.json`` (preset, sliding window, softmax, inverse of the
preprocessing, argmax) with the network the run recorded and its ``models/model.pt``, and writes
``DIR/<input name>_pred.nii.gz`` (uint8 class values) with the input's shape and affine.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medssl3d.data.errors import InputError
from medssl3d.jobs.bundles import BundleJob, bundle_dir, parse_overrides, progress_handlers, read_configs
from medssl3d.jobs.finetune import SEGMENTATION, read_run_record, trained_model

CONFIGS = ("inference",)
PRED_SUFFIX = "_pred.nii.gz"
SHOWN = ("datalist", "ckpt_dir", "output_dir", "arch", "feature_size", "roi_size", "modality", "spacing_mm",
         "label_names", "sw_batch_size", "sw_overlap")


def _volume_name(path: Path) -> str | None:
    """``path``'s name without its volume ending, or ``None`` when it is not a volume file."""
    from medssl3d.data.folder_scan import VOLUME_SUFFIXES

    ending = next((s for s in VOLUME_SUFFIXES if path.name.lower().endswith(s)), None)
    return path.name[: -len(ending)] if ending else None


def input_volumes(inputs: Sequence[str | os.PathLike]) -> dict[str, Path]:
    """The volumes to segment, by output name.

    A file is taken as given; a folder gives the volume files directly in it, or itself when it holds none
    (a DICOM series).

    Raises:
        InputError: an input does not exist or is a file that is not a volume.
        ValueError: two inputs would write the same output name.
    """
    volumes: dict[str, Path] = {}
    for item in inputs:
        path = Path(item).expanduser().resolve()
        if not path.exists():
            raise InputError(path, "not found")
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and _volume_name(p) is not None)
            found = [(_volume_name(p), p) for p in files] or [(path.name, path)]
        elif _volume_name(path) is None:
            raise InputError(path, "not a volume (NIfTI, NRRD or MetaImage file, or a DICOM series folder)")
        else:
            found = [(_volume_name(path), path)]
        for name, volume in found:
            if name in volumes:
                raise ValueError(f"{volume}: its prediction {name}{PRED_SUFFIX} would overwrite that of "
                                 f"{volumes[name]}")
            volumes[name] = volume
    return volumes


def predict_job(
    run_dir: Path, volumes: Sequence[Path], output: Path, settings: dict[str, Any], overrides: Sequence[str] = ()
) -> BundleJob:
    """The bundle's inference of ``run_dir``'s model on ``volumes``, writing to ``output``."""
    bundle = bundle_dir(SEGMENTATION)
    job_overrides: dict[str, Any] = {
        **settings,
        "datalist": [str(v) for v in volumes],
        "ckpt_dir": str(run_dir / "models"),
        "output_dir": str(output),
        **progress_handlers(read_configs(bundle, CONFIGS), "handlers", "prediction"),
    }
    return BundleJob(
        bundle=bundle, configs=CONFIGS, workflow_type="infer", overrides=job_overrides,
        user_overrides=parse_overrides(overrides), shown=SHOWN,
    )


def run_predict(
    run: str | os.PathLike, inputs: Sequence[str | os.PathLike], output: str | os.PathLike, *,
    overrides: Sequence[str] = (), dry_run: bool = False,
) -> int:
    """Segment ``inputs`` with a fine-tuned run (or with ``dry_run`` describe it); returns the exit status.

    Raises:
        InputError: not a run folder, no model yet, or a missing / unreadable input.
        ValueError: clashing output names or a bad override (MONAI's wrappers removed).
    """
    run_dir = Path(run).expanduser().resolve()
    record = read_run_record(run_dir)
    trained_model(run_dir)
    volumes = input_volumes(inputs)
    out = Path(output).expanduser().resolve()
    job = predict_job(run_dir, list(volumes.values()), out, record["settings"], overrides)
    if dry_run:
        print(job.describe())
        return 0
    job.run()
    for name in volumes:
        print(f"wrote {out / (name + PRED_SUFFIX)}")
    return 0
