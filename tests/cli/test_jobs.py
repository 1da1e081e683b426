"""``medssl3d pretrain / finetune / evaluate / predict`` as a user runs them: subprocesses on phantom NIfTI files.

One chain at smoke size (Swin tiny, 64^3): pretrain 2 steps, run again to step 3 (resumed), fine-tune from the
exported encoder for an epoch, run again to epoch 2 (resumed), evaluate on the held-out test split, predict an
oblique volume; then the dry runs and one user error per command (exit status 2, one line naming the culprit).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medssl3d.data.phantoms import make_phantom, write_nifti
from medssl3d.jobs.bundles import bundle_dir

pytestmark = pytest.mark.slow

SHAPE = (64, 64, 64)
SPACING = (1.5, 1.5, 1.5)
TRAIN_CASES = ("case0", "case1", "case2")
TEST_CASE = "case3"
# one thread per process on the 2-core machine; small loaders in this process
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
PRETRAIN = ("--size", "tiny", "--roi", "64", "--set", "train#trainer#config#num_workers=0",
            "--set", "train#trainer#config#batch_size=1")
FINETUNE = ("--set", "num_workers=0", "--set", "num_samples=1", "--set", "sw_batch_size=1",
            "--set", "train#trainer#epoch_length=1")


def medssl3d(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medssl3d", *map(str, args)], capture_output=True,
                          encoding="utf-8", cwd=cwd, env=ENV, timeout=600)


def assert_user_error(done: subprocess.CompletedProcess, *names: str) -> None:
    """Exit status 2 and one ERROR line, naming each of ``names``, as the last line; no traceback."""
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and done.stderr.rstrip().splitlines()[-1] == errors[0], done.stderr[-3000:]
    for name in names:
        assert name in errors[0], errors[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("jobs")


@pytest.fixture(scope="module")
def dataset(work) -> Path:
    """A Decathlon-style folder: three labelled training cases, one labelled test case (imagesTs/labelsTs)."""
    root = work / "Task01_Phantoms"
    for i, name in enumerate((*TRAIN_CASES, TEST_CASE)):
        images, labels = ("imagesTs", "labelsTs") if name == TEST_CASE else ("imagesTr", "labelsTr")
        phantom = make_phantom(shape=SHAPE, spacing=SPACING, seed=i)
        write_nifti(phantom.image, phantom.affine, root / images / f"{name}.nii.gz")
        write_nifti(phantom.label, phantom.affine, root / labels / f"{name}.nii.gz")
    return root


@pytest.fixture(scope="module")
def pretrain_run(work, dataset) -> tuple[Path, subprocess.CompletedProcess]:
    out = work / "pretrain"
    return out, medssl3d("pretrain", "swin_ssl", "--data", dataset, "--out", out, "--steps", 2, *PRETRAIN, cwd=work)


@pytest.fixture(scope="module")
def finetune_run(work, pretrain_run) -> tuple[Path, subprocess.CompletedProcess]:
    out, _ = pretrain_run
    run = work / "finetune"
    encoder = out / "models" / "encoder_swinunetr.pt"
    return run, medssl3d("finetune", "--data", work / "Task01_Phantoms", "--pretrained", encoder, "--out", run,
                         "--epochs", 1, *FINETUNE, cwd=work)


def test_pretrain_writes_a_described_encoder_and_resumes(pretrain_run, dataset, work):
    out, first = pretrain_run
    assert first.returncode == 0, first.stderr[-3000:]
    assert "swin_ssl: step 2/2" in first.stdout
    assert "steps/s | ETA" in first.stderr  # the engine's progress lines
    datalist = json.loads((out / "datalist.json").read_text())
    assert len(datalist["training"]) + len(datalist["validation"]) == len(TRAIN_CASES)
    assert [Path(e["image"]).name for e in datalist["test"]] == [f"{TEST_CASE}.nii.gz"]
    encoder = torch.load(out / "models" / "encoder_swinunetr.pt", weights_only=True)
    info = encoder["medssl3d_encoder"]
    assert (info["method"], info["backbone_size"], info["roi_size"], info["steps"]) == ("swin_ssl", "tiny", [64] * 3, 2)
    assert info["width"]["feature_size"] == 12 and info["preset"]["modality"] == "ct"
    assert any(k.startswith("swinViT.") for k in encoder["state_dict"])

    again = medssl3d("pretrain", "swin_ssl", "--data", dataset, "--out", out, "--steps", 3, *PRETRAIN, cwd=work)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "swin_ssl: step 3/3 (resumed from step 2)" in again.stdout
    assert torch.load(out / "runs" / "checkpoints" / "last.pt", weights_only=False)["step"] == 3
    steps = [json.loads(line)["step"] for line in (out / "runs" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_finetune_configures_itself_from_the_encoder_and_resumes(finetune_run, work, pretrain_run):
    run, first = finetune_run
    assert first.returncode == 0, first.stderr[-3000:]
    assert "to epoch 1/1; best validation mean Dice" in first.stdout
    assert "training epoch 1/1 iteration 1/1 (100%) |" in first.stderr and "it/s | ETA" in first.stderr
    settings = json.loads((run / "run.json").read_text())["settings"]
    assert (settings["arch"], settings["feature_size"], settings["roi_size"]) == ("swinunetr", 12, [64] * 3)
    assert (run / "models" / "model.pt").is_file()
    assert torch.load(run / "models" / "checkpoint.pt", weights_only=True)["trainer"]["iteration"] == 1

    encoder = pretrain_run[0] / "models" / "encoder_swinunetr.pt"
    again = medssl3d("finetune", "--data", work / "Task01_Phantoms", "--pretrained", encoder, "--out", run,
                     "--epochs", 2, *FINETUNE, cwd=work)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {run / 'models' / 'checkpoint.pt'}" in again.stderr
    assert "training epoch 2/2 iteration 2/2 (100%)" in again.stderr
    assert "training epoch 1/2" not in again.stderr  # the first epoch is not trained again
    assert torch.load(run / "models" / "checkpoint.pt", weights_only=True)["trainer"]["iteration"] == 2


def test_evaluate_reports_dice_hd95_and_surface_dice(finetune_run, work):
    run, _ = finetune_run
    done = medssl3d("evaluate", run, "--split", "test", "--tolerance-mm", "3", "--set", "num_workers=0",
                    "--set", "sw_batch_size=1", cwd=work)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| class" in done.stdout and "HD95 (mm)" in done.stdout and "surface Dice (3 mm)" in done.stdout
    report_dir = run / "eval" / "test"
    assert (report_dir / "metrics.md").read_text().strip() in done.stdout
    names = ["body", "fat", "liver", "spleen", "spine", "fluid"]
    for stem in ("dice_per_class", "hd95_per_class", "surface_dice_per_class"):
        report = json.loads((report_dir / f"{stem}.json").read_text())
        assert list(report["per_class"]) == names
        assert report["mean"] is not None and math.isfinite(report["mean"]), (stem, report)
        assert [Path(c["image"]).name for c in report["cases"]] == [f"{TEST_CASE}.nii.gz"]
    dice = json.loads((report_dir / "dice_per_class.json").read_text())["mean"]
    nsd = json.loads((report_dir / "surface_dice_per_class.json").read_text())["mean"]
    assert 0.0 <= dice <= 1.0 and 0.0 <= nsd <= 1.0
    assert json.loads((report_dir / "hd95_per_class.json").read_text())["mean"] > 0.0


def test_predict_writes_labels_on_the_input_grid(finetune_run, work):
    run, _ = finetune_run
    phantom = make_phantom(shape=(40, 48, 56), spacing=(2.0, 1.5, 1.25), rotation_deg=(0.0, 0.0, 15.0), seed=7)
    source = write_nifti(phantom.image, phantom.affine, work / "new" / "oblique.nii.gz")
    done = medssl3d("predict", run, source, "-o", work / "pred", "--set", "sw_batch_size=1", cwd=work)
    assert done.returncode == 0, done.stderr[-3000:]
    written = work / "pred" / "oblique_pred.nii.gz"
    assert f"wrote {written}" in done.stdout and "prediction epoch 1/1 iteration 1/1" in done.stderr
    image, pred = nib.load(source), nib.load(written)
    assert pred.shape == image.shape
    np.testing.assert_allclose(pred.affine, image.affine, atol=1e-4)
    assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= set(range(7))


def test_dry_runs_print_the_resolved_config_and_run_nothing(work, dataset, pretrain_run):
    out = work / "dry"
    done = medssl3d("pretrain", "swin_ssl", "--data", dataset, "--out", out, "--preset", "no_paste_cutout",
                    "--size", "tiny", "--gpus", 2, "--dry-run", cwd=work)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "configs:   train.json, multi_gpu_train.json" in done.stdout
    assert '"method_preset": "no_paste_cutout"' in done.stdout  # the preset: one bundle id, resolved by the bundle
    resolved = dict(line.split(None, 1) for line in done.stdout.split("resolved ids:")[1].splitlines()[1:]
                    if line.startswith("  ") and len(line.split(None, 1)) == 2)
    assert resolved["method#paste_cutout"].startswith("false") and resolved["backbone_size"] == '"tiny"'
    assert resolved["method#gather_distributed"].startswith("true")  # the multi-GPU overlay
    assert "torch.distributed.run --standalone --nproc_per_node 2 -m medssl3d pretrain swin_ssl" in done.stdout
    assert not out.exists()  # nothing written, nothing trained

    encoder = pretrain_run[0] / "models" / "encoder_swinunetr.pt"
    done = medssl3d("finetune", "--data", dataset, "--pretrained", encoder, "--out", out, "--dry-run", cwd=work)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"^ +feature_size +12$", done.stdout, re.M), done.stdout  # from the encoder's description
    assert not out.exists()


def test_evaluate_and_predict_dry_runs_use_the_run_record(finetune_run, work):
    run, _ = finetune_run
    done = medssl3d("evaluate", run, "--split", "validation", "--tolerance-mm", "1.5", "--dry-run", cwd=work)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "configs:   train.json, evaluate.json" in done.stdout
    assert re.search(r"^ +surface_dice_tolerance_mm +1\.5$", done.stdout, re.M), done.stdout
    assert re.search(r"^ +feature_size +12$", done.stdout, re.M), done.stdout
    assert not (run / "eval" / "validation").exists()
    done = medssl3d("predict", run, work / "Task01_Phantoms" / "imagesTs", "-o", work / "dry_pred", "--dry-run",
                    cwd=work)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "configs:   inference.json (infer workflow)" in done.stdout
    assert f'["{work / "Task01_Phantoms" / "imagesTs" / f"{TEST_CASE}.nii.gz"}"]' in done.stdout
    assert not (work / "dry_pred").exists()


def test_user_errors_are_one_line_with_exit_status_2(work, dataset, finetune_run):
    bad = work / "bad.json"
    bad.write_text('{"training": [')
    assert_user_error(medssl3d("pretrain", "swin_ssl", "--data", bad, "--out", work / "bad", "--steps", 1,
                               *PRETRAIN, cwd=work), str(bad), "cannot read")

    from monai.networks.nets import SwinUNETR

    from medssl3d.transfer.export import export_weights, save_weights

    wide = save_weights(export_weights(SwinUNETR(in_channels=1, out_channels=2, feature_size=24).state_dict(),
                                       "swinunetr"), work / "wide_encoder.pt")
    assert_user_error(medssl3d("finetune", "--data", dataset, "--pretrained", wide, "--out", work / "wide",
                               "--epochs", 1, "--set", "feature_size=12", "--set", "roi_size=[64,64,64]", *FINETUNE,
                               cwd=work), str(wide), "did not load fully")

    run, _ = finetune_run
    assert_user_error(medssl3d("evaluate", run, "--split", "holdout", cwd=work), "datalist.json", "holdout")
    notes = work / "notes.txt"
    notes.write_text("not a scan")
    assert_user_error(medssl3d("predict", run, notes, "-o", work / "p", cwd=work), str(notes), "not a volume")


def test_monai_bundle_run_ends_with_the_error_sentence(work):
    missing = work / "missing" / "dataset.json"
    done = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/train.json", "--datalist", str(missing),
         "--ckpt_dir", str(work / "mb" / "models"), "--output_dir", str(work / "mb" / "eval")],
        capture_output=True, encoding="utf-8", cwd=bundle_dir("segmentation"), env=ENV, timeout=600,
    )
    assert done.returncode != 0
    assert "Traceback" in done.stderr  # nothing is swallowed
    last = done.stderr.rstrip().splitlines()[-1]
    assert last.startswith("InputError: ") and str(missing) in last, last
