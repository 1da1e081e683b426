"""``medssl3d evaluate RUN``: Dice, HD95 and surface Dice per class of a fine-tuned run on one datalist split.

The job runs the segmentation bundle's ``train.json`` + ``evaluate.json`` with the network the run recorded
(``run.json``) and its ``models/model.pt``. The bundle writes, per metric, the per-class means and per-case
values as JSON and CSV to ``RUN/eval/<split>/`` (``dice_per_class``, ``hd95_per_class``,
``surface_dice_per_class``, plus MONAI's ``MetricsSaver`` files); the job prints them as one table and saves
it there as ``metrics.md``. HD95 and surface Dice are in mm on the preset's grid; surface Dice counts boundary
voxels within ``surface_dice_tolerance_mm`` (one tolerance for every class).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medssl3d.jobs.bundles import BundleJob, bundle_dir, parse_overrides, progress_handlers, read_configs
from medssl3d.jobs.finetune import SEGMENTATION, read_run_record, trained_model
from medssl3d.jobs.inputs import datalist_for

CONFIGS = ("train", "evaluate")
TOLERANCE_ID = "surface_dice_tolerance_mm"
#: Report files of the bundle (stem -> the table's column name; ``{tol}`` is the surface-Dice tolerance).
REPORTS = {"dice_per_class": "Dice", "hd95_per_class": "HD95 (mm)", "surface_dice_per_class": "surface Dice ({tol} mm)"}
TABLE_FILE = "metrics.md"
SHOWN = ("datalist", "eval_split", "ckpt_dir", "output_dir", "arch", "feature_size", "roi_size", "modality",
         "spacing_mm", "label_names", TOLERANCE_ID)


def evaluate_job(
    run_dir: Path, datalist: Path, split: str, settings: dict[str, Any], *,
    tolerance_mm: float | None = None, overrides: Sequence[str] = (),
) -> BundleJob:
    """The bundle's evaluation of ``run_dir``'s model on ``split`` of ``datalist``, reporting to ``RUN/eval/<split>``.

    Raises:
        ValueError: a tolerance that is not positive.
    """
    bundle = bundle_dir(SEGMENTATION)
    job_overrides: dict[str, Any] = {
        **settings,
        "datalist": str(datalist),
        "eval_split": split,
        "pretrained": "",
        "ckpt_dir": str(run_dir / "models"),
        "output_dir": str(run_dir / "eval" / split),
        **progress_handlers(read_configs(bundle, CONFIGS), "validate#handlers", f"evaluation ({split})"),
    }
    if tolerance_mm is not None:
        if not tolerance_mm > 0:
            raise ValueError(f"--tolerance-mm must be > 0, got {tolerance_mm}")
        job_overrides[TOLERANCE_ID] = tolerance_mm
    return BundleJob(
        bundle=bundle, configs=CONFIGS, workflow_type="train", overrides=job_overrides,
        user_overrides=parse_overrides(overrides), shown=SHOWN,
    )


def metrics_table(report_dir: Path, tolerance_mm: float) -> str:
    """The bundle's per-class reports in ``report_dir`` as one Markdown table (classes, then the mean)."""
    reports = {stem: json.loads((report_dir / f"{stem}.json").read_text()) for stem in REPORTS}
    columns = [title.format(tol=f"{tolerance_mm:g}") for title in REPORTS.values()]
    classes = list(reports["dice_per_class"]["per_class"])
    rows = [[name, *(_cell(r["per_class"].get(name)) for r in reports.values())] for name in classes]
    rows.append(["mean", *(_cell(r["mean"]) for r in reports.values())])
    header = ["class", *columns]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [header, ["-" * w for w in widths], *rows]
    return "\n".join("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |" for line in lines)


def _cell(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.4f}"


def run_evaluate(
    run: str | os.PathLike, *, data: str | os.PathLike | None = None, split: str = "test",
    tolerance_mm: float | None = None, overrides: Sequence[str] = (), dry_run: bool = False,
) -> int:
    """Evaluate (or with ``dry_run`` describe) a fine-tuned run; returns the exit status.

    Args:
        run: a run folder of ``medssl3d finetune``.
        data: a datalist JSON or folder (``None``: the datalist the run trained on).
        split: the datalist split to evaluate.
        tolerance_mm: surface-Dice tolerance (``None``: the bundle's).
        overrides: ``id=value`` bundle overrides.
        dry_run: print the resolved config instead of evaluating.

    Raises:
        InputError: not a run folder, no model yet, or missing / unreadable data.
        ValueError: a split the datalist lacks, a bad label map or override (MONAI's wrappers removed).
    """
    run_dir = Path(run).expanduser().resolve()
    record = read_run_record(run_dir)
    trained_model(run_dir)
    report_dir = run_dir / "eval" / split
    datalist = datalist_for(data, report_dir, write=not dry_run) if data is not None else Path(record["datalist"])
    job = evaluate_job(run_dir, datalist, split, record["settings"], tolerance_mm=tolerance_mm, overrides=overrides)
    if dry_run:
        print(job.describe())
        return 0
    workflow = job.run().workflow
    table = metrics_table(report_dir, float(workflow.parser.get_parsed_content(TOLERANCE_ID)))
    (report_dir / TABLE_FILE).write_text(table + "\n")
    print(f"{split} split of {datalist} ({run_dir.name}):\n{table}\nwritten to {report_dir}")
    return 0
