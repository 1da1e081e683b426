"""``medssl3d bench transfer``: how much does pretraining buy with few labels? (benchmarks.md §3).

For each task (:mod:`medssl3d.bench.tasks`):

1. every method is pretrained through its bundle on the task's pretraining pool (the sample heads minus the
   task's test subjects) for the same number of steps at the same batch size and size; tasks with the same
   pool share these runs;
2. for each k of the ladder and each seed, k labelled volumes or crops are drawn (nested in k), and the
   segmentation bundle fine-tunes from scratch and from every method's encoder on exactly those, with the
   same seed and the same number of iterations (``finetune_steps``: epochs = ceil(steps / k)). The network
   follows the encoder (SwinUNETR, or UNETR for a ViT), and each network has its own scratch arm
   (``scratch``, ``scratch_unetr``), so that a method is always compared with the same network untrained;
   with ``initial_encoders``, each family also has a control arm (``init``, ``init_unetr``): the encoder its
   bundles build from the pretraining seed, exported before any step and fine-tuned with the pretrained arms'
   recipe. Every method of a family starts from that encoder, so a method's difference to it is what its
   pretraining learned, apart from the different start and the lower encoder learning rate;
3. each model is tested on the held-out data: Dice per class, from the bundle's own report.

The record holds one row per pretraining run, one per fine-tuning run (task, method, k, seed, Dice per class
and their mean), an ``error`` row for any run that failed (the others go on), and one row per (task, method,
k) over seeds: mean, sd and the paired difference against its scratch arm with the same seed (and against its
control arm). A PNG with the record's stem plots Dice and that difference against k.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medssl3d.bench.figure import plot_budget_curve, plot_transfer
from medssl3d.bench.finetune import FinetuneRecipe, finetune_and_test, snapshot_dir
from medssl3d.bench.pretrain import (
    PretrainResult,
    export_target,
    failure_text,
    initial_encoder,
    pretrain,
    pretraining_overrides,
    weight_change,
)
from medssl3d.bench.record import default_output, format_table, write_record
from medssl3d.bench.suite import load_suite
from medssl3d.bench.tasks import (
    Task,
    check_source,
    finetune_preset,
    load_task,
    pretraining_preset,
    training_units,
    write_datalist,
)
from medssl3d.data.sample import atomic_write_json

logger = logging.getLogger(__name__)

KIND = "transfer"
SCRATCH = "scratch"
BASELINE = "swin_ssl"
SCRATCH_TARGET = "swinunetr"
#: The from-scratch arm of each network family: a method is compared with the scratch run of its own network.
SCRATCH_ARMS = {"swinunetr": SCRATCH, "unetr": f"{SCRATCH}_unetr"}
INIT = "init"
#: The control arm of each network family: the encoder its bundles start from, fine-tuned like a pretrained one.
INIT_ARMS = {"swinunetr": INIT, "unetr": f"{INIT}_unetr"}
RUNS_SUFFIX = "-runs"
CURVE_SUFFIX = "-steps"
CACHE_DIR_NAME = "cache"
POOL_HASH_CHARS = 10
ROW_PRETRAIN = "pretrain"
ROW_RUN = "run"
ROW_SUMMARY = "summary"
ROW_ERROR = "error"
MODEL_FILE = Path("models") / "model.pt"
#: Each finished pretraining and fine-tuning run leaves its row here: run again with the same record (``-o``),
#: the benchmark picks up where it stopped.
RESULT_FILE = "result.json"
#: Rows of a run's snapshots (the curve), beside its :data:`RESULT_FILE`.
CURVE_FILE = "curve.json"
DICE_DIGITS = 3


@dataclass(frozen=True)
class TransferBenchConfig:
    """A suite of the transfer benchmark (``configs/bench/transfer.yaml``).

    Attributes:
        tasks: task names (:data:`medssl3d.bench.tasks.TASKS`).
        methods: pretraining bundles compared (the baseline ``swin_ssl`` among them); scratch is always run.
        source: ``"sample"`` (the real scans) or ``"phantoms"`` (synthetic; tests).
        ks: the ladder of labelled volumes / crops; values above a volume task's labelled volumes are skipped.
        seeds: fine-tuning seeds (each also draws the labelled units); paired across methods.
        backbone_size: encoder size of pretraining and fine-tuning.
        roi: crop side in voxels, pretraining and fine-tuning.
        spacing_mm: preset spacing of pretraining, fine-tuning and testing.
        task_spacing_mm: a task's own spacing where it needs another (e.g. ``{"chest_ct": 2.0}``).
        pretrain_steps: the pretraining budget, identical for every method.
        pretrain_batch: volumes per pretraining step, identical for every method.
        pretrain_seed: seed of the pretraining runs.
        finetune_steps: fine-tuning iterations (one labelled unit each), identical for every k and arm.
        finetune_samples: random crops per labelled unit per iteration.
        finetune_lr: fine-tuning learning rate.
        finetune_warmup_fraction: the bundle's ``warmup_epochs`` as a fraction of each run's epochs.
        encoder_lr_scale: the bundle's ``encoder_lr_scale`` (pretrained arms).
        freeze_encoder_fraction: the bundle's ``freeze_encoder_epochs`` (pretrained arms) as a fraction of each
            run's epochs, rounded down.
        curve_fractions: fractions of ``finetune_steps`` at which the smallest k's runs are also tested, for the
            figure of Dice against fine-tuning steps (the network each run kept at that point: one run per curve).
        crop_mm: side of a labelled crop (crop tasks).
        keep_models: keep every fine-tuned ``models/model.pt`` (off: deleted once tested; a ``full`` suite makes
            a few hundred base-size models, hundreds of MB each).
        cache_dir: pretraining preprocessing cache; empty: ``cache/`` beside the record.
        initial_encoders: also fine-tune each network family's control arm (:data:`INIT_ARMS`) from the encoder
            of its first method at step 0.
        bundle_overrides: per-method bundle settings for this size (e.g. ``{"ace": {"grid_n": 4}}``).
    """

    tasks: tuple[str, ...] = ("brain_extraction",)
    methods: tuple[str, ...] = ("swin_ssl", "afire")
    source: str = "sample"
    ks: tuple[int, ...] = (1, 2)
    seeds: tuple[int, ...] = (0, 1)
    backbone_size: str = "tiny"
    roi: int = 64
    spacing_mm: float = 3.0
    task_spacing_mm: dict[str, float] = field(default_factory=dict)
    pretrain_steps: int = 4
    pretrain_batch: int = 2
    pretrain_seed: int = 0
    finetune_steps: int = 4
    finetune_samples: int = 1
    finetune_lr: float = 1e-3
    finetune_warmup_fraction: float = 0.0
    encoder_lr_scale: float = 1.0
    freeze_encoder_fraction: float = 0.0
    curve_fractions: tuple[float, ...] = ()
    crop_mm: float = 64.0
    keep_models: bool = False
    cache_dir: str = ""
    initial_encoders: bool = False
    bundle_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_source(self.source)
        for name in ("tasks", "ks", "seeds"):
            if not getattr(self, name):
                raise ValueError(f"{name} must not be empty")
        for name in ("finetune_warmup_fraction", "freeze_encoder_fraction"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must lie in [0, 1), got {getattr(self, name)}")
        if any(not 0 < f < 1 for f in self.curve_fractions):
            raise ValueError(f"curve_fractions must lie in (0, 1), got {list(self.curve_fractions)}")
        arms = {*SCRATCH_ARMS.values(), *INIT_ARMS.values()}
        if set(self.methods) & arms:
            raise ValueError(f"{sorted(arms)} are arms of the benchmark, not methods; do not list them in methods")

    def spacing(self, task: str) -> float:
        """The preset spacing of ``task`` (its own, else the suite's)."""
        return float(self.task_spacing_mm.get(task, self.spacing_mm))
        if min(self.ks) < 1:
            raise ValueError(f"every k must be >= 1, got {list(self.ks)}")
        for name in ("pretrain_steps", "pretrain_batch", "finetune_steps", "finetune_samples", "roi"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


# ----------------------------------------------------------------------------------- aggregation
#: Two-sided 95 % quantiles of Student's t by degrees of freedom (the normal one beyond the table).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def ci95_half_width(sd: float, n: int) -> float:
    """Half-width of the 95 % t-interval of a mean of ``n`` values with sample sd ``sd``.

    Between tabulated degrees of freedom the next lower row is used (a wider, conservative interval).
    """
    if n < 2:
        raise ValueError(f"a confidence interval needs at least 2 values, got {n}")
    dof = n - 1
    known = [d for d in T95 if d <= dof]
    t = T95[max(known)] if dof <= max(T95) else statistics.NormalDist().inv_cdf(0.975)
    return t * sd / math.sqrt(n)


def _mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample sd (``None`` for fewer than two values)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _text(mean: float, sd: float | None, sign: bool = False) -> str:
    fmt = f"{'+' if sign else ''}.{DICE_DIGITS}f"
    return format(mean, fmt) if sd is None else f"{format(mean, fmt)} ± {sd:.{DICE_DIGITS}f}"


def _dice_fields(row: Mapping[str, Any]) -> list[str]:
    """The run row's per-class Dice keys (``dice_<class>``)."""
    return [k for k in row if k.startswith("dice_")]


def aggregate(runs: Sequence[Mapping[str, Any]], reference: str = SCRATCH) -> list[dict[str, Any]]:
    """One row per (task, method, k) over seeds: mean ± sd of Dice, and the paired difference to a reference.

    Args:
        runs: run rows with ``task``, ``method``, ``k``, ``seed``, ``unit``, ``dice`` (mean over classes),
            ``dice_<class>`` values (non-numbers, e.g. a class absent from the test data, are left out) and
            optionally ``reference``: the arm this method is compared with (default ``reference``), and
            ``control``: a second arm it is compared with.
        reference: the arm differences are taken against, seed by seed, where a row names none.

    Returns:
        Rows with ``task, method, k, [steps,] unit, n_seeds, dice, dice_sd`` (sd only for two seeds or more),
        ``dice_<class>`` / ``dice_<class>_sd``, and for methods other than their reference ``reference, diff,
        diff_sd, n_pairs`` (the mean Dice minus the reference's, per seed present in both), plus ``dice_text``
        / ``diff_text`` strings; with a ``control`` arm the same against it, prefixed ``control_`` (``control``,
        ``control_diff``, ...).
    """
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for row in runs:
        groups.setdefault((row["task"], row["method"], row["k"], row.get("steps")), []).append(row)
    summary = []
    for (task, method, k, steps), rows in groups.items():
        rows = sorted(rows, key=lambda r: r["seed"])
        dice, dice_sd = _mean_sd([r["dice"] for r in rows])
        out: dict[str, Any] = {"row": ROW_SUMMARY, "task": task, "method": method, "k": k,
                               "unit": rows[0]["unit"], "n_seeds": len(rows), "dice": dice}
        if steps is not None:
            out["steps"] = steps
        if dice_sd is not None:
            out["dice_sd"] = dice_sd
        out["dice_text"] = _text(dice, dice_sd)
        for key in dict.fromkeys(key for r in rows for key in _dice_fields(r)):
            values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
            if values:
                mean, sd = _mean_sd(values)
                out[key] = mean
                if sd is not None:
                    out[f"{key}_sd"] = sd
        arm = rows[0].get("reference", reference)
        if method != arm:
            out.update(_paired_difference(rows, groups.get((task, arm, k, steps), []), reference=arm))
        control = rows[0].get("control")
        if control is not None and method != control:
            paired = _paired_difference(rows, groups.get((task, control, k, steps), []), reference=control)
            out.update({f"control_{key}" if key != "reference" else "control": value
                        for key, value in paired.items()})
        summary.append(out)
    return summary


def _paired_difference(rows: Sequence[Mapping[str, Any]], reference_rows: Sequence[Mapping[str, Any]], *,
                       reference: str) -> dict[str, Any]:
    """The mean Dice of ``rows`` minus the reference's, seed by seed over the seeds present in both.

    Returns:
        ``reference, diff, n_pairs, diff_text`` (and ``diff_sd``, ``diff_ci95`` from two pairs); ``{}`` when no
        seed is in both.
    """
    ref = {r["seed"]: r["dice"] for r in reference_rows}
    pairs = [r["dice"] - ref[r["seed"]] for r in rows if r["seed"] in ref]
    if not pairs:
        return {}
    diff, diff_sd = _mean_sd(pairs)
    out = {"reference": reference, "diff": diff, "n_pairs": len(pairs), "diff_text": _text(diff, diff_sd, sign=True)}
    if diff_sd is not None:
        out["diff_sd"] = diff_sd
        out["diff_ci95"] = ci95_half_width(diff_sd, len(pairs))
        out["diff_text"] += f" (95 % CI {diff - out['diff_ci95']:+.{DICE_DIGITS}f} … " \
            f"{diff + out['diff_ci95']:+.{DICE_DIGITS}f})"
    return out


def summary_table(summary: Sequence[Mapping[str, Any]], class_names: Mapping[str, Sequence[str]]) -> str:
    """Markdown: one table per task.

    Columns: method, k, seeds, Dice mean ± sd, the paired difference to the scratch run of the same network
    (and which one), where control arms ran the paired difference to the network's initial encoder, Dice per
    class.
    """
    parts = []
    for task, names in class_names.items():
        rows = [r for r in summary if r["task"] == task]
        if not rows:
            continue
        columns = [("method", "method", "s"), ("k", f"k ({rows[0]['unit']}s)", "d"), ("n_seeds", "seeds", "d"),
                   ("dice_text", "Dice mean ± sd", "s"), ("diff_text", "Δ vs scratch (paired)", "s"),
                   ("reference", "vs", "s")]
        if any("control_diff_text" in r for r in rows):
            columns.append(("control_diff_text", "Δ vs initial encoder (paired)", "s"))
        columns += [(f"dice_{name}", name, f".{DICE_DIGITS}f") for name in names]
        parts.append(f"### {task}\n\n" + format_table(rows, columns))
    return "\n\n".join(parts)


# ----------------------------------------------------------------------------------- runs
def _pool_id(task: Task) -> str:
    subjects = sorted(e.get("subject", e["image"]) for e in task.pretrain)
    return hashlib.sha256("\n".join(subjects).encode()).hexdigest()[:POOL_HASH_CHARS]


def _error_row(stage: str, task: str, method: str, error: Exception, **fields: Any) -> dict[str, Any]:
    logger.exception("%s of %s for %s failed; the benchmark goes on without it", stage, method, task)
    return {"row": ROW_ERROR, "stage": stage, "task": task, "method": method, **fields,
            "error": failure_text(error)}


def _pretrain_all(cfg: TransferBenchConfig, tasks: Sequence[Task], work: Path, cache_dir: Path
                  ) -> tuple[dict[tuple[str, str], PretrainResult], list[dict[str, Any]]]:
    """Pretrain every method once per distinct pretraining pool; export the control arms' encoders.

    Returns:
        ``{(task, arm): result}`` for every method and control arm (a failed run is left out, with an error row)
        and the record rows.
    """
    results: dict[tuple[str, str], PretrainResult] = {}
    rows = []
    done: dict[tuple[str, str], PretrainResult | None] = {}
    for task in tasks:
        pool = f"{task.modality}-{cfg.spacing(task.name):g}mm-{_pool_id(task)}"
        datalist = write_datalist(work / "pretrain" / pool / "datalist.json", {"training": task.pretrain},
                                  name=f"pretraining pool of {task.name}")
        jobs = [(method, method, cfg.pretrain_steps) for method in cfg.methods]
        if cfg.initial_encoders:
            firsts = _first_of_family(cfg, task, pool, datalist, work, cache_dir)
            jobs += [(INIT_ARMS[family], method, 0) for family, method in firsts]
        for arm, method, steps in jobs:
            if (pool, arm) not in done:
                try:
                    done[(pool, arm)] = _pretrain_arm(cfg, task, pool, datalist, arm, method, steps, work, cache_dir)
                except Exception as error:  # noqa: BLE001 - one failing method must not end a long benchmark
                    done[(pool, arm)] = None
                    rows.append(_error_row("pretraining", task.name, arm, error, pool=pool))
                    continue
                result = done[(pool, arm)]
                rows.append({
                    "row": ROW_PRETRAIN, "method": arm, "bundle": method, "task": task.name, "pool": pool,
                    "pool_subjects": ",".join(sorted(e.get("subject", "") for e in task.pretrain)),
                    "steps": result.steps, "batch_size": cfg.pretrain_batch, "final_loss": result.final_loss,
                    "time_s": result.time_s, "export_target": result.export_target,
                })
            if done[(pool, arm)] is not None:
                results[(task.name, arm)] = done[(pool, arm)]
        for row in rows:  # how far pretraining moved each encoder from the start its control arm fine-tunes
            start = results.get((task.name, INIT_ARMS.get(row.get("export_target"), "")))
            if (row["row"] == ROW_PRETRAIN and row["pool"] == pool and row["steps"] and start is not None
                    and "encoder_change" not in row):  # a pool shared with an earlier task is measured once
                row["encoder_change"] = weight_change(results[(task.name, row["method"])].encoder, start.encoder)
    return results, rows


def _first_of_family(cfg: TransferBenchConfig, task: Task, pool: str, datalist: Path, work: Path, cache_dir: Path
                     ) -> list[tuple[str, str]]:
    """``(network family, method)``: the first method of each family with a control arm, in ``cfg.methods`` order.

    A method's family is its bundle's export target.
    """
    firsts: dict[str, str] = {}
    for method in cfg.methods:
        overrides = _pretraining_overrides(cfg, task, pool, datalist, method, method, work, cache_dir)
        firsts.setdefault(export_target(method, overrides), method)
    return [(family, method) for family, method in firsts.items() if family in INIT_ARMS]


def _pretraining_overrides(cfg: TransferBenchConfig, task: Task, pool: str, datalist: Path, arm: str, method: str,
                           work: Path, cache_dir: Path) -> dict[str, Any]:
    """``method``'s bundle settings for arm ``arm`` of ``pool`` (its run folder ``pretrain/<pool>/<arm>``)."""
    return pretraining_overrides(
        datalist=datalist, run_dir=work / "pretrain" / pool / arm, cache_dir=cache_dir,
        preset=pretraining_preset(cfg.spacing(task.name), task.modality),
        backbone_size=cfg.backbone_size, roi=cfg.roi, batch_size=cfg.pretrain_batch,
        seed=cfg.pretrain_seed, extra=cfg.bundle_overrides.get(method),
    )


def _pretrain_arm(cfg: TransferBenchConfig, task: Task, pool: str, datalist: Path, arm: str, method: str,
                  steps: int, work: Path, cache_dir: Path) -> PretrainResult:
    """``method``'s bundle for ``steps`` steps (0: its encoder as built) as arm ``arm`` of ``pool``.

    A result that a previous run of the same record left is read back instead.
    """
    saved = work / "pretrain" / pool / arm / RESULT_FILE
    if saved.is_file():  # the same record again: a finished run is not repeated
        fields = json.loads(saved.read_text())
        return PretrainResult(**{**fields, "encoder": Path(fields["encoder"])})
    overrides = _pretraining_overrides(cfg, task, pool, datalist, arm, method, work, cache_dir)
    result = pretrain(method, overrides, steps=steps) if steps else initial_encoder(method, overrides)
    atomic_write_json(saved, {**asdict(result), "encoder": str(result.encoder)})
    return result


def _arms(cfg: TransferBenchConfig, task: Task, encoders: Mapping[tuple[str, str], PretrainResult]
          ) -> list[tuple[str, str, PretrainResult | None]]:
    """``(arm, network family, encoder)``: a scratch arm per family in use, the control arms, then the methods."""
    pretrained = [(m, encoders[(task.name, m)]) for m in cfg.methods if (task.name, m) in encoders]
    families = dict.fromkeys([SCRATCH_TARGET, *(e.export_target for _, e in pretrained)])
    controls = [(INIT_ARMS[f], encoders.get((task.name, INIT_ARMS[f]))) for f in families if f in INIT_ARMS]
    return [*((SCRATCH_ARMS[f], f, None) for f in families if f in SCRATCH_ARMS),
            *((arm, e.export_target, e) for arm, e in controls if e is not None),
            *((m, e.export_target, e) for m, e in pretrained)]


def _pairing(arm: str, family: str, arms: Sequence[str]) -> dict[str, str]:
    """The arms a run of ``arm`` is compared with: its family's scratch arm, and its control arm if one ran."""
    pairing = {"network": family, "reference": SCRATCH_ARMS[family]}
    if arm not in (*SCRATCH_ARMS.values(), *INIT_ARMS.values()) and INIT_ARMS.get(family) in arms:
        pairing["control"] = INIT_ARMS[family]
    return pairing


def _finetune_all(cfg: TransferBenchConfig, task: Task, encoders: Mapping[tuple[str, str], PretrainResult],
                  work: Path) -> list[dict[str, Any]]:
    """Every (k, seed, arm) fine-tuning run of one task; one row each (an error row for a failed run)."""
    preset = finetune_preset(task, cfg.spacing(task.name))
    arms = _arms(cfg, task, encoders)
    rows = []
    for k in cfg.ks:
        if task.max_k is not None and k > task.max_k:
            logger.info("%s: skipping k=%d (the task has %d labelled volumes)", task.name, k, task.max_k)
            continue
        curve = cfg.curve_fractions if k == min(cfg.ks) else ()
        for seed in cfg.seeds:
            units = training_units(task, k, seed, work / "tasks" / task.name / "crops", cfg.crop_mm)
            rows += _finetune_arms(cfg, task, arms, units, preset, k, seed, curve, work)
    return rows


def _snapshot_epochs(fractions: Sequence[float], epochs: int) -> list[int]:
    """The epochs of a run of ``epochs`` at which the curve tests it: each fraction rounded, 1 to ``epochs - 1``."""
    return sorted({e for e in (max(1, round(f * epochs)) for f in fractions) if e < epochs})


def _finetune_arms(cfg: TransferBenchConfig, task: Task, arms: Sequence[tuple[str, str, PretrainResult | None]],
                   units: Sequence[dict], preset, k: int, seed: int, curve: Sequence[float],
                   work: Path) -> list[dict[str, Any]]:
    """Every arm of one (k, seed) on the same labelled units: a row each (an error row for a failure).

    Each run is also tested at the ``curve`` fractions of its length: a row for each of those snapshots.
    """
    steps = cfg.finetune_steps
    run_root = work / "finetune" / task.name / f"k{k}" / f"seed{seed}" / f"steps{steps}"
    # validation (which picks the saved model) re-uses the labelled units: the test data stays unseen
    datalist = write_datalist(run_root / "datalist.json", {"training": units, "validation": units, "test": task.test},
                              name=task.name, labels=task.label_names)
    rows = []
    names = [arm for arm, _, _ in arms]
    for arm, family, encoder in arms:
        pairing = _pairing(arm, family, names)
        epochs = math.ceil(steps / k)
        recipe = FinetuneRecipe(
            backbone_size=cfg.backbone_size, roi=cfg.roi, epochs=epochs, samples=cfg.finetune_samples,
            lr=cfg.finetune_lr, seed=seed, warmup_epochs=cfg.finetune_warmup_fraction * epochs,
            encoder_lr_scale=cfg.encoder_lr_scale, freeze_encoder_epochs=int(cfg.freeze_encoder_fraction * epochs),
        )
        snapshots = _snapshot_epochs(curve, epochs)
        saved, saved_curve = run_root / arm / RESULT_FILE, run_root / arm / CURVE_FILE
        # the same record again: a finished run is not repeated (its pairing is today's)
        done = json.loads(saved_curve.read_text()) if snapshots and saved_curve.is_file() else []
        if saved.is_file() and [r["epochs"] for r in done] == snapshots:
            rows += [{**row, **pairing} for row in [*done, json.loads(saved.read_text())]]
            continue
        logger.info("%s k=%d seed=%d steps=%d: fine-tuning %s from %s", task.name, k, seed, steps, family, arm)
        start = time.perf_counter()
        try:
            report, reports = finetune_and_test(
                run_root / arm, datalist, task.label_names, preset, recipe, export_target=family,
                pretrained=encoder.encoder if encoder else None, snapshot_epochs=snapshots,
            )
        except Exception as error:  # noqa: BLE001 - one failing run must not end a long benchmark
            rows.append(_error_row("fine-tuning", task.name, arm, error, k=k, seed=seed, steps=steps))
            continue
        # a snapshot's steps count its iterations as the run's do: one labelled unit each
        curve_rows = [{**_run_row(task, arm, k, seed, units, reports[e], e), "steps": e * k, "snapshot_of": steps,
                       **pairing} for e in snapshots]
        row = {**_run_row(task, arm, k, seed, units, report, epochs), "time_s": time.perf_counter() - start,
               "steps": steps, **pairing}
        if snapshots:
            atomic_write_json(saved_curve, curve_rows)
        atomic_write_json(saved, row)
        rows += [*curve_rows, row]
        if not cfg.keep_models:
            (run_root / arm / MODEL_FILE).unlink(missing_ok=True)
            for snapshot in snapshot_dir(run_root / arm).glob("*.pt"):
                snapshot.unlink()
    return rows


def _run_row(task: Task, method: str, k: int, seed: int, units: Sequence[dict], report: Mapping[str, Any],
             epochs: int) -> dict[str, Any]:
    per_class = report["per_class"]
    row: dict[str, Any] = {
        "row": ROW_RUN, "task": task.name, "method": method, "k": k, "seed": seed, "unit": task.unit,
        "train_cases": ",".join(u["case"] for u in units), "epochs": epochs,
    }
    # a class absent from both the test label and the prediction has no Dice: recorded as a string
    row.update({f"dice_{name}": per_class.get(name) if per_class.get(name) is not None else "absent"
                for name in task.class_names})
    numbers = [v for v in per_class.values() if v is not None]
    row["dice"] = statistics.fmean(numbers) if numbers else 0.0
    return row


def run(
    suite: str = "smoke", output: str | os.PathLike | None = None, overrides: Sequence[str] = ()
) -> tuple[Path, str]:
    """Run the transfer benchmark suite ``suite``: the JSON record, and a PNG with the same stem.

    Args:
        suite: preset of ``configs/bench/transfer.yaml`` (``smoke``, ``full``) or ``path.yaml:preset``.
        output: the JSON record; default ``outputs/bench/transfer-<suite>-<time>.json``. Runs (pretraining,
            fine-tuning, derived task files) go to ``<stem>-runs/`` beside it.
        overrides: ``key=value`` changes to the suite (e.g. ``seeds=[0]``).

    Returns:
        ``(record path, Markdown table of the full fine-tuning budget)``. The figures are ``<stem>.png`` (Dice
        against k) and, with ``curve_fractions``, ``<stem>-steps.png`` (Dice against fine-tuning steps at the
        smallest k).
    """
    cfg = load_suite(TransferBenchConfig, KIND, suite, overrides)
    output = Path(output) if output is not None else default_output(KIND, suite)
    work = output.parent / f"{output.stem}{RUNS_SUFFIX}"
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else output.parent / CACHE_DIR_NAME
    start, start_cpu = time.perf_counter(), time.process_time()
    tasks = [load_task(name, source=cfg.source, root=work) for name in cfg.tasks]
    encoders, pretrain_rows = _pretrain_all(cfg, tasks, work, cache_dir)
    rows = [row for task in tasks for row in _finetune_all(cfg, task, encoders, work)]
    run_rows = [r for r in rows if r["row"] == ROW_RUN]
    summary = aggregate(run_rows)
    if not summary:
        raise RuntimeError(f"every fine-tuning run failed: {[r['error'] for r in rows]}")
    references = {*SCRATCH_ARMS.values(), *INIT_ARMS.values()}
    baseline = BASELINE if BASELINE in cfg.methods else None
    full_budget = [r for r in summary if r["steps"] == cfg.finetune_steps]
    figure = plot_transfer(full_budget, output.with_suffix(".png"), references=references, baseline=baseline)
    figures = [figure.name]
    if cfg.curve_fractions:
        curve = [r for r in summary if r["k"] == min(cfg.ks)]
        figures.append(plot_budget_curve(curve, output.with_name(f"{output.stem}{CURVE_SUFFIX}.png"),
                                         references=references, baseline=baseline).name)
    minutes = (time.perf_counter() - start) / 60
    # on a shared machine the process's CPU time says more about the cost than its wall time
    config = {**asdict(cfg), "suite": suite, "figures": figures, "wall_minutes": minutes,
              "cpu_minutes": (time.process_time() - start_cpu) / 60}
    path = write_record(output, KIND, suite, config, [*pretrain_rows, *rows, *summary])
    logger.info("transfer benchmark finished in %.1f minutes: %s, %s", minutes, path, figure)
    return path, summary_table(full_budget, {t.name: t.class_names for t in tasks})
