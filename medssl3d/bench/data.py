"""``medssl3d bench data``: can one data-loader worker feed a training step? (benchmarks.md §2).

For each method, its bundle's own training dataset (``train#dataset``: the preset cached on disk by a
``PersistentDataset``, the method's random views drawn per access) is built on the real sample MRI heads at
the suite's size. A first pass over every volume fills the caches (preset, registrations) and is timed
apart. Then, in this process with one intra-op thread (what a ``DataLoader`` worker gets), items are drawn
the way the engine draws them (reseeded per index): the view rate per worker is the median over repeats of
items per second, where one *item* is everything one batch element of a step needs (e.g. SwinSSL's two
crops). The step rate is the median time of the method's training steps on those items at the same size
(``Pretrainer``, bundle recipe, after warm-up). Workers needed = ceil(items a second of steps consumes /
items one worker makes a second).

A step time from another machine can stand in for the one measured here: with ``step_record`` set to a
``medssl3d bench step`` record of the same size, crop and batch (the GPU's ``--suite full``), the ``full``
suite run on any machine reports the workers each method needs at ``base`` size on that record's device, from
the view rate of one worker here. The two step times differ a little in what they hold: the engine's records
include collating a batch of ready items, the step benchmark's batch is collated before the timing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from medssl3d.bench.pretrain import failure_text, fill_caches, pretraining_overrides, pretraining_workflow
from medssl3d.bench.record import default_output, format_table, write_record
from medssl3d.bench.suite import load_suite
from medssl3d.bench.tasks import check_source, pretraining_images, pretraining_preset, write_datalist
from medssl3d.data.errors import InputError
from medssl3d.engine.monitor import METRICS_FILE
from medssl3d.engine.sampler import SeededDataset
from medssl3d.engine.trainer import Pretrainer

logger = logging.getLogger(__name__)

KIND = "data"
#: A ``DataLoader`` worker runs with one intra-op thread (PyTorch sets it in every worker).
WORKER_THREADS = 1
STEP_RATE_KEY = "perf/steps_per_s"
STEP_RECORD_KIND = "step"
#: No checkpoint falls inside the timed steps (one is written after the last).
NO_CHECKPOINT = 10**9
CACHE_DIR_NAME = "cache"

COLUMNS = (
    ("method", "method", "s"),
    ("views_per_s", "views/s per worker", ".2f"),
    ("view_s", "s per view", ".3f"),
    ("step_s", "step s", ".2f"),
    ("views_per_step", "views per step", "d"),
    ("view_to_step_ratio", "views/s ÷ views needed/s", ".2f"),
    ("workers_needed", "workers needed", "d"),
    ("first_pass_s", "first pass s", ".1f"),
)
ERROR_COLUMN = ("error", "error", "s")


@dataclass(frozen=True)
class DataBenchConfig:
    """A suite of the data benchmark (``configs/bench/data.yaml``).

    Attributes:
        methods: bundles to measure (method names).
        source: ``"sample"`` (the real scans) or ``"phantoms"`` (synthetic; tests).
        backbone_size: model size of the step timing (``tiny`` / ``small`` / ``base``).
        roi: crop side in voxels.
        spacing_mm: preset spacing; ``None`` keeps the MRI preset's (1 mm).
        batch_size: items per step.
        repeats: timed repeats of the view rate (the median is reported).
        views_per_repeat: items drawn per repeat.
        step_warmup: untimed steps first (allocation, autotuning).
        step_repeats: timed steps (the median is reported).
        seed: seed of the item draws and the training steps.
        cache_dir: preprocessing cache; empty: ``cache/`` beside the record.
        bundle_overrides: per-method bundle settings for this size (e.g. ``{"ace": {"grid_n": 4}}``).
        step_record: a ``medssl3d bench step`` record made at this suite's size, crop and batch (e.g. a GPU's
            ``--suite full``): each method's step time is read from it instead of being measured here, so the
            workers needed are those of that record's device. Empty: steps are timed here.
    """

    methods: tuple[str, ...] = ("swin_ssl", "alice", "afire", "dira", "ace")
    source: str = "sample"
    backbone_size: str = "tiny"
    roi: int = 64
    spacing_mm: float | None = None
    batch_size: int = 2
    repeats: int = 5
    views_per_repeat: int = 4
    step_warmup: int = 1
    step_repeats: int = 3
    seed: int = 0
    cache_dir: str = ""
    bundle_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    step_record: str = ""

    def __post_init__(self) -> None:
        check_source(self.source)
        for name in ("roi", "batch_size", "repeats", "views_per_repeat", "step_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.repeats * self.views_per_repeat < self.batch_size:
            raise ValueError(f"repeats * views_per_repeat must give at least one batch of {self.batch_size} items")
        if self.step_warmup < 0:
            raise ValueError(f"step_warmup must be >= 0, got {self.step_warmup}")
        if not self.methods:
            raise ValueError("methods must name at least one method")


class _Items(Dataset):
    """Items drawn once, served again: the step timing then costs no view generation."""

    def __init__(self, items: Sequence[Any]):
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[index]


def workers_needed(items_per_step: int, step_s: float, items_per_s: float) -> int:
    """Loader workers that keep a step fed: ``ceil(items_per_step / step_s / items_per_s)`` (at least 1).

    Raises:
        ValueError: a non-positive time or rate.
    """
    if step_s <= 0 or items_per_s <= 0:
        raise ValueError(f"step_s and items_per_s must be > 0, got {step_s}, {items_per_s}")
    return max(1, math.ceil(items_per_step / step_s / items_per_s))


def time_views(dataset: Dataset, *, repeats: int, per_repeat: int, seed: int) -> tuple[list[float], list[Any]]:
    """Items per second of ``dataset`` in this process with one intra-op thread, per repeat.

    Items are drawn as the engine draws them (``SeededDataset``: the transform is reseeded per index),
    cycling over the dataset.

    Returns:
        ``(rate of each repeat, the items drawn)``.
    """
    seeded = SeededDataset(dataset, seed=seed)
    previous = torch.get_num_threads()
    torch.set_num_threads(WORKER_THREADS)
    rates, items = [], []
    try:
        for r in range(repeats):
            start = time.perf_counter()
            for j in range(per_repeat):
                items.append(seeded[(r, j % len(dataset))])
            rates.append(per_repeat / (time.perf_counter() - start))
    finally:
        torch.set_num_threads(previous)
    return rates, items


def time_steps(method, items: Sequence[Any], train_config: Mapping[str, Any], *, batch_size: int, warmup: int,
               repeats: int, seed: int) -> list[float]:
    """Seconds per training step of ``method`` on ``items`` (the bundle's engine settings), after ``warmup``.

    Each step's time is the engine's own per-step throughput record (``log_every=1``): forward, backward,
    optimizer and EMA, plus collating a batch of ready items.
    """
    with tempfile.TemporaryDirectory(prefix="bench-data-steps-") as out:
        config = {
            **train_config, "batch_size": batch_size, "num_workers": 0, "log_every": 1,
            "ckpt_every": NO_CHECKPOINT, "tensorboard": False, "resume": None, "seed_transforms": False,
            "seed": seed, "out_dir": out,
        }
        Pretrainer(method, _Items(items), config=config, max_steps=warmup + repeats).run()
        records = [json.loads(line) for line in (Path(out) / METRICS_FILE).read_text().splitlines()]
    rates = [r[STEP_RATE_KEY] for r in records if r["step"] > warmup]
    return [1.0 / r for r in rates]


def recorded_step_times(path: str | os.PathLike, cfg: DataBenchConfig) -> tuple[dict[str, float], str]:
    """Each method's median step time in a ``bench step`` record, and the device it was measured on.

    Raises:
        InputError: the file cannot be read.
        ValueError: it is not a step record, or was made at another size, crop or batch than ``cfg``'s.
    """
    path = Path(path).expanduser()
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(path, f"cannot read the step record ({err})") from err
    if record.get("kind") != STEP_RECORD_KIND:
        raise ValueError(f"{path}: not a bench step record (kind {record.get('kind')!r})")
    config = record["config"]
    expected = {"size": cfg.backbone_size, "roi": [cfg.roi] * 3, "batch_size": cfg.batch_size}
    found = {key: config.get(key) for key in expected}
    if found != expected:
        raise ValueError(f"{path}: measured at {found}; this suite needs {expected}")
    return {row["name"]: row["step_s"] for row in record["results"] if "step_s" in row}, config["device"]


def measure_method(
    method: str, cfg: DataBenchConfig, datalist: Path, cache_dir: Path, work: Path,
    recorded: tuple[dict[str, float], str] | None = None,
) -> dict:
    """One row: the view rate of ``method``'s bundle dataset, its step time and the workers a step needs.

    ``recorded`` (from :func:`recorded_step_times`) gives the step time instead of timing steps here.

    Raises:
        ValueError: ``recorded`` holds no step time of ``method``.
    """
    if recorded is not None and method not in recorded[0]:
        raise ValueError(f"{cfg.step_record}: no step time of {method!r}")
    preset = pretraining_preset(cfg.spacing_mm)
    overrides = pretraining_overrides(
        datalist=datalist, run_dir=work / method, cache_dir=cache_dir, preset=preset,
        backbone_size=cfg.backbone_size, roi=cfg.roi, batch_size=cfg.batch_size, seed=cfg.seed,
        extra=cfg.bundle_overrides.get(method),
    )
    workflow = pretraining_workflow(method, overrides)
    dataset = workflow.parser.get_parsed_content("train#dataset")
    first_pass_s = fill_caches(dataset)
    logger.info("%s: first pass over %d volumes (caches filled) in %.1f s", method, len(dataset), first_pass_s)
    rates, items = time_views(dataset, repeats=cfg.repeats, per_repeat=cfg.views_per_repeat, seed=cfg.seed)
    views_per_s = statistics.median(rates)
    logger.info("%s: %.2f views/s per worker (median of %d repeats)", method, views_per_s, len(rates))
    if recorded is None:
        model = workflow.parser.get_parsed_content("method")
        train_config = workflow.parser.get_parsed_content("train#trainer#config")
        steps = time_steps(model, items, train_config, batch_size=cfg.batch_size, warmup=cfg.step_warmup,
                           repeats=cfg.step_repeats, seed=cfg.seed)
        step_s, step_source = statistics.median(steps), "measured here"
        logger.info("%s: %.2f s per step (median of %d)", method, step_s, len(steps))
    else:
        step_s, step_source = recorded[0][method], f"{cfg.step_record} ({recorded[1]})"
    return {
        "method": method,
        "backbone_size": cfg.backbone_size,
        "roi": cfg.roi,
        "volumes": len(dataset),
        "views_per_s": views_per_s,
        "views_per_s_min": min(rates),
        "views_per_s_max": max(rates),
        "view_s": 1.0 / views_per_s,
        "step_s": step_s,
        "steps_per_s": 1.0 / step_s,
        "views_per_step": cfg.batch_size,
        "view_to_step_ratio": views_per_s * step_s / cfg.batch_size,
        "workers_needed": workers_needed(cfg.batch_size, step_s, views_per_s),
        "step_source": step_source,
        "first_pass_s": first_pass_s,
    }


def run(
    suite: str = "smoke", output: str | os.PathLike | None = None, overrides: Sequence[str] = ()
) -> tuple[Path, str]:
    """Run the data benchmark suite ``suite`` and write its record.

    Args:
        suite: preset of ``configs/bench/data.yaml`` (``smoke``, ``full``) or ``path.yaml:preset``.
        output: the JSON record; default ``outputs/bench/data-<suite>-<time>.json``.
        overrides: ``key=value`` changes to the suite (e.g. ``methods=[swin_ssl]``).

    Returns:
        ``(record path, Markdown table)``.
    """
    cfg = load_suite(DataBenchConfig, KIND, suite, overrides)
    output = Path(output) if output is not None else default_output(KIND, suite)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else output.parent / CACHE_DIR_NAME
    recorded = recorded_step_times(cfg.step_record, cfg) if cfg.step_record else None
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        work = Path(tmp)
        images = pretraining_images(cfg.source, cache_dir)
        datalist = write_datalist(work / "pretrain.json", {"training": images}, name="bench data")
        for method in cfg.methods:
            try:
                rows.append(measure_method(method, cfg, datalist, cache_dir, work, recorded))
            except Exception as error:  # noqa: BLE001 - one failing method must not end the benchmark
                logger.exception("measuring %s failed; the benchmark goes on without it", method)
                rows.append({"method": method, "error": failure_text(error)})
    config = {**asdict(cfg), "in_process_worker": "num_workers=0, one intra-op thread", "suite": suite}
    path = write_record(output, KIND, suite, config, rows)
    columns = COLUMNS + (ERROR_COLUMN,) if any("error" in r for r in rows) else COLUMNS
    table = format_table(rows, columns)
    if recorded is not None:
        table += f"\n\nStep times from {cfg.step_record} (on {recorded[1]}); view rates of one worker here."
    return path, table
