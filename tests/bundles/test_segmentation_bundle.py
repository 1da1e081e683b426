"""The segmentation bundle end to end: train (smoke overlay, pretrained encoder), evaluate, infer, verify."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.networks.nets import SwinUNETR

from medssl3d.bundle_support.smoke_data import write_smoke_datalist
from medssl3d.bundle_support.verify import verify_bundle
from medssl3d.data.phantoms import make_phantom, write_nifti
from medssl3d.transfer.export import export_weights, save_weights

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "segmentation"
CONFIGS = BUNDLE / "configs"
META = CONFIGS / "metadata.json"
SMOKE_FEATURES = 12
SMOKE_ROI = [64, 64, 64]
ENCODER_KEY = "swinViT.patch_embed.proj.weight"
# a short run: one iteration of one epoch exercises every part of the workflow
QUICK_TRAIN = {"train#trainer#max_epochs": 1, "train#trainer#epoch_length": 1}
# inference input on a grid unlike the preset's (anisotropic, rotated, shifted) to check the inversion
INFER_SHAPE = (40, 48, 56)
INFER_SPACING = (2.0, 1.5, 1.25)
INFER_ROTATION = (0.0, 0.0, 15.0)
INFER_ORIGIN = (-40.0, 25.0, 10.0)


def channel_def() -> dict[str, str]:
    return json.loads(META.read_text())["network_data_format"]["outputs"]["pred"]["channel_def"]


def cfg(*names: str) -> list[str]:
    return [str(CONFIGS / f"{n}.json") for n in names]


def workflow(names, workflow_type, **override) -> ConfigWorkflow:
    return ConfigWorkflow(
        config_file=cfg(*names), meta_file=str(META), logging_file=False, workflow_type=workflow_type,
        **{"metadata_file": str(META), **override},
    )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("seg_bundle")


@pytest.fixture(scope="module")
def encoder_file(run_dir) -> tuple[Path, dict]:
    """An encoder exported from a freshly initialised SwinUNETR (the shape a pretraining run exports)."""
    torch.manual_seed(1)
    donor = SwinUNETR(in_channels=1, out_channels=2, feature_size=SMOKE_FEATURES)
    weights = export_weights(donor.state_dict(), "swinunetr")
    return save_weights(weights, run_dir / "encoder.pt"), weights


@pytest.fixture(scope="module")
def trained(run_dir, encoder_file) -> Path:
    """Train through ConfigWorkflow (train.json + smoke.json) from the exported encoder."""
    path, weights = encoder_file
    wf = workflow(
        ["train", "smoke"],
        "train",
        bundle_root=str(run_dir),
        pretrained=str(path),
        **QUICK_TRAIN,
    )
    wf.initialize()
    assert wf.check_properties() == []
    net = wf.parser.get_parsed_content("network")
    torch.testing.assert_close(net.state_dict()[ENCODER_KEY], weights[ENCODER_KEY])
    wf.run()
    wf.finalize()
    return run_dir


def test_train_from_pretrained_saves_plain_state_dict(trained):
    model = trained / "smoke" / "models" / "model.pt"
    state = torch.load(model, map_location="cpu", weights_only=True)
    reference = SwinUNETR(in_channels=1, out_channels=len(channel_def()), feature_size=SMOKE_FEATURES)
    reference = reference.state_dict()
    assert not [k for k in state if k.startswith("module.")]
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in reference.items()}
    assert list((trained / "smoke" / "eval").glob("events.out.tfevents.*")), "no TensorBoard events written"


@pytest.mark.parametrize("pretrained", [True, False], ids=["pretrained", "scratch"])
def test_recipe_ids_reach_the_optimizer_and_schedule(run_dir, encoder_file, pretrained):
    wf = workflow(["train", "smoke"], "train", bundle_root=str(run_dir / "recipe"),
                  pretrained=str(encoder_file[0]) if pretrained else "", learning_rate=1e-3,
                  encoder_lr_scale=0.1, warmup_epochs=1, freeze_encoder_epochs=1)
    wf.initialize()
    opt = wf.parser.get_parsed_content("optimizer")
    sched = wf.parser.get_parsed_content("lr_scheduler")
    handlers = wf.parser.get_parsed_content("train#handlers")
    assert any(getattr(h, "lr_scheduler", None) is sched for h in handlers)
    assert [g["name"] for g in opt.param_groups] == ["decoder", "encoder"]
    assert [g["initial_lr"] for g in opt.param_groups] == pytest.approx([1e-3, 1e-4 if pretrained else 1e-3])
    # warm-up from 0 for both groups; the encoder's frozen epoch only applies to a pretrained encoder
    assert sched.get_last_lr() == [0.0, 0.0]
    per_epoch = len(wf.parser.get_parsed_content("train#dataloader"))
    for _ in range(per_epoch):
        opt.step()
        sched.step()
    decoder_lr, encoder_lr = sched.get_last_lr()
    assert decoder_lr > 0 and (encoder_lr == 0.0) == pretrained


def test_encoder_description_configures_the_bundle_and_a_mismatch_is_refused(run_dir, encoder_file):
    from medssl3d.data.presets import preset_for
    from medssl3d.transfer.encoder_info import describe_encoder, encoder_run_info, save_encoder

    run = encoder_run_info(method="alice", export_target="swinunetr", backbone_size="tiny", roi_size=SMOKE_ROI,
                           preset=preset_for("mri", 2.5))
    info = describe_encoder(run, steps=10, source="teacher")
    described = save_encoder(encoder_file[1], run_dir / "described.pt", info)
    # train.json alone: every network and preprocessing setting comes from the encoder
    parser = ConfigParser()
    parser.read_config(cfg("train"))
    parser.update({"bundle_root": str(run_dir), "metadata_file": str(META), "pretrained": str(described)})
    assert [parser.get_parsed_content(k) for k in ("arch", "feature_size", "modality", "spacing_mm", "roi_size")] \
        == ["swinunetr", 12, "mri", [2.5, 2.5, 2.5], SMOKE_ROI]
    net = parser.get_parsed_content("network_pretrained")
    torch.testing.assert_close(net.state_dict()[ENCODER_KEY], encoder_file[1][ENCODER_KEY])
    parser.update({"feature_size": 24})
    parser.ref_resolver.reset()
    with pytest.raises(RuntimeError) as err:  # MONAI wraps the error of a config expression
        parser.get_parsed_content("network_pretrained", lazy=False)
    assert isinstance(err.value.__cause__, ValueError)
    expected = "encoder pretrained with feature_size=12 (alice), the bundle sets feature_size=24"
    assert expected in str(err.value.__cause__)


def test_pretrained_path_that_does_not_exist_fails(run_dir):
    missing = str(run_dir / "missing.pt")
    wf = workflow(["train", "smoke"], "train", bundle_root=str(run_dir), pretrained=missing)
    wf.initialize()
    with pytest.raises(RuntimeError) as failure:
        wf.parser.get_parsed_content("network")
    assert "missing.pt" in str(failure.value.__cause__) and "does not exist" in str(failure.value.__cause__)


def test_evaluate_writes_dice_per_class(trained):
    wf = workflow(["train", "smoke", "evaluate"], "train", bundle_root=str(trained))
    wf.initialize()
    assert wf.check_properties() == []
    wf.run()
    wf.finalize()
    report = json.loads((trained / "smoke" / "eval" / "dice_per_class.json").read_text())
    names = [v for k, v in sorted(channel_def().items(), key=lambda kv: int(kv[0])) if k != "0"]
    assert list(report["per_class"]) == names
    assert len(report["cases"]) == 1 and report["cases"][0]["image"].endswith("case002.nii.gz")
    for value in report["per_class"].values():
        assert value is None or 0.0 <= value <= 1.0
    csv_lines = (trained / "smoke" / "eval" / "dice_per_class.csv").read_text().splitlines()
    assert csv_lines[0].split(",") == ["image", *names] and csv_lines[-1].startswith("mean,")
    assert (trained / "smoke" / "eval" / "val_mean_dice_raw.csv").is_file()


def test_snapshots_keep_the_network_of_each_interval_and_evaluate_reads_the_one_named(run_dir):
    root = run_dir / "snapshots"
    # validation (which saves models/model.pt) only after the last epoch: model.pt is the last network
    train = workflow(["train", "smoke"], "train", bundle_root=str(root), snapshot_every=1, val_interval=2,
                     **{**QUICK_TRAIN, "train#trainer#max_epochs": 2})
    train.initialize()
    train.run()
    train.finalize()
    models = root / "smoke" / "models"
    kept = {p.name: torch.load(p, map_location="cpu", weights_only=True) for p in (models / "snapshots").glob("*.pt")}
    assert sorted(kept) == ["model_epoch=1.pt", "model_epoch=2.pt"]
    last = torch.load(models / "model.pt", map_location="cpu", weights_only=True)
    assert all(torch.equal(last[k], v) for k, v in kept["model_epoch=2.pt"].items())
    assert not all(torch.equal(last[k], v) for k, v in kept["model_epoch=1.pt"].items())

    def evaluate(checkpoint: Path | None, output: str) -> dict:
        ids = {"eval_checkpoint": str(checkpoint)} if checkpoint else {}
        wf = workflow(["train", "smoke", "evaluate"], "train", bundle_root=str(root),
                      output_dir=str(root / output), **ids)
        wf.initialize()
        wf.run()
        wf.finalize()
        return json.loads((root / output / "dice_per_class.json").read_text())

    last_snapshot = evaluate(models / "snapshots" / "model_epoch=2.pt", "eval2")
    assert last_snapshot["per_class"] == evaluate(None, "eval")["per_class"]
    with pytest.raises(Exception) as failure:  # noqa: PT011 - MONAI wraps the loader's error in its own
        evaluate(models / "snapshots" / "model_epoch=7.pt", "eval7")
    assert isinstance(failure.value.__cause__, FileNotFoundError) and "model_epoch=7.pt" in str(failure.value.__cause__)


def test_inference_writes_prediction_on_input_grid(trained):
    phantom = make_phantom(
        shape=INFER_SHAPE, spacing=INFER_SPACING, rotation_deg=INFER_ROTATION, origin=INFER_ORIGIN, seed=7
    )
    image = write_nifti(phantom.image, phantom.affine, trained / "infer_in" / "subject.nii.gz")
    out_dir = trained / "infer_out"
    wf = workflow(
        ["inference"],
        "infer",
        bundle_root=str(trained),
        ckpt_dir=str(trained / "smoke" / "models"),
        output_dir=str(out_dir),
        dataset_dir=str(image.parent),
        feature_size=SMOKE_FEATURES,
        roi_size=SMOKE_ROI,
        sw_batch_size=1,
    )
    wf.initialize()
    assert wf.check_properties() == []
    wf.run()
    wf.finalize()
    pred = nib.load(out_dir / "subject_pred.nii.gz")
    source = nib.load(image)
    assert pred.shape[:3] == source.shape[:3] == INFER_SHAPE
    np.testing.assert_allclose(pred.affine, source.affine, atol=1e-4)
    values = np.unique(np.asarray(pred.dataobj))
    assert set(values.tolist()) <= set(range(len(channel_def())))


def test_label_names_and_network_agree_across_configs():
    names = channel_def()
    meta = json.loads(META.read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == len(names)
    shapes = []
    for config in ("train", "inference"):
        parser = ConfigParser()
        parser.read_config(cfg(config))
        parser.read_meta(str(META))
        parser.update({"bundle_root": str(BUNDLE), "feature_size": SMOKE_FEATURES})
        assert parser.get_parsed_content("label_names") == names
        assert parser.get_parsed_content("num_classes") == len(names)
        net = parser.get_parsed_content("network_def")
        shapes.append({k: tuple(v.shape) for k, v in net.state_dict().items()})
    assert shapes[0] == shapes[1]


def test_unetr_selected_by_one_override():
    parser = ConfigParser()
    parser.read_config(cfg("train"))
    parser.read_meta(str(META))
    parser.update({"bundle_root": str(BUNDLE), "arch": "unetr", "roi_size": [32, 32, 32], "vit_hidden_size": 96,
                   "vit_mlp_dim": 192, "vit_num_heads": 4, "feature_size": 8})
    net = parser.get_parsed_content("network_def")
    assert type(net).__name__ == "UNETR"
    with torch.no_grad():
        assert net(torch.zeros(1, 1, 32, 32, 32)).shape == (1, len(channel_def()), 32, 32, 32)


@pytest.mark.slow
def test_smoke_command_runs_from_bundle_folder(tmp_path):
    bundle = tmp_path / "segmentation"
    shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("smoke", "models", "eval", "__pycache__"))
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run",
         "--config_file", "['configs/train.json','configs/smoke.json']"],
        cwd=bundle, capture_output=True, encoding="utf-8", env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert (bundle / "smoke" / "models" / "model.pt").is_file()
    assert (bundle / "smoke" / "data" / "dataset.json").is_file()


def test_verify_bundle_passes():
    assert verify_bundle(BUNDLE, network_overrides={"feature_size": SMOKE_FEATURES}) == []


@pytest.mark.parametrize("field", ["network_data_format", "version", "monai_version", "authors"])
def test_verify_bundle_fails_without_required_metadata(tmp_path, field):
    bundle = tmp_path / "segmentation"
    shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("smoke", "models", "eval"))
    meta = json.loads(META.read_text())
    del meta[field]
    (bundle / "configs" / "metadata.json").write_text(json.dumps(meta))
    problems = verify_bundle(bundle, check_network=False)
    assert len(problems) == 1 and "metadata.json" in problems[0] and field in problems[0]


def test_verify_bundle_fails_when_channel_count_disagrees(tmp_path):
    bundle = tmp_path / "segmentation"
    shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("smoke", "models", "eval"))
    meta = json.loads(META.read_text())
    meta["network_data_format"]["outputs"]["pred"]["num_channels"] = len(channel_def()) + 1
    (bundle / "configs" / "metadata.json").write_text(json.dumps(meta))
    problems = verify_bundle(bundle, network_overrides={"feature_size": SMOKE_FEATURES})
    assert len(problems) == 1 and "inference.json" in problems[0] and "output channel" in problems[0]


def test_verify_bundle_lists_missing_files(tmp_path):
    bundle = tmp_path / "segmentation"
    shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("smoke", "models", "eval"))
    (bundle / "LICENSE").unlink()
    (bundle / "configs" / "smoke.json").unlink()
    problems = verify_bundle(bundle)
    assert sorted(Path(p.split(":")[0]).name for p in problems) == ["LICENSE", "smoke.json"]


def test_smoke_datalist_is_written_once(tmp_path):
    first = write_smoke_datalist(tmp_path / "d", n_train=1, n_val=1, shape=(32, 32, 32))
    stamp = Path(first).stat().st_mtime_ns
    assert write_smoke_datalist(tmp_path / "d", n_train=1, n_val=1, shape=(32, 32, 32)) == first
    assert Path(first).stat().st_mtime_ns == stamp
    datalist = json.loads(Path(first).read_text())
    assert len(datalist["training"]) == len(datalist["validation"]) == 1
    assert datalist["labels"] == channel_def()
    assert all((tmp_path / "d" / case["label"]).is_file() for case in datalist["training"])


def test_training_data_caches_the_preprocessing_and_crops_from_the_cache(trained):
    """CacheDataset keeps the preset's output (reading and resampling once); each epoch only draws crops."""
    wf = workflow(["train", "smoke"], "train", bundle_root=str(trained))
    wf.initialize()
    for split in ("train", "validate"):
        dataset = wf.parser.get_parsed_content(f"{split}#dataset")
        cached = dataset._cache[0]
        # the cache holds tensors on the preset's grid, not the file paths the datalist gives
        assert isinstance(cached["image"], torch.Tensor) and cached["image"].ndim == 4, split
    dataset = wf.parser.get_parsed_content("train#dataset")
    crop = dataset[0][0]["image"]
    assert tuple(crop.shape[1:]) == tuple(wf.parser.get_parsed_content("roi_size"))


@pytest.mark.parametrize("fused", [True, False])
def test_fused_attention_switch_reaches_the_network(fused):
    from medssl3d.networks.window_attention import FusedWindowAttention

    for config in ("train", "inference"):
        parser = ConfigParser()
        parser.read_config(cfg(config))
        parser.read_meta(str(META))
        parser.update({"bundle_root": str(BUNDLE), "backbone_size": "tiny", "fused_attention": fused})
        net = parser.get_parsed_content("network_def")
        assert any(isinstance(m, FusedWindowAttention) for m in net.modules()) == fused, config
