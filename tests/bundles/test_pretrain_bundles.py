"""Every pretraining bundle end to end: schema, ConfigWorkflow with the smoke overlay, torchrun with gloo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.networks.nets import UNETR, SwinUNETR

from medssl3d.bundle_support.verify import verify_bundle
from medssl3d.engine.checkpoint import load_checkpoint
from medssl3d.networks.backbones import BACKBONE_SIZES
from medssl3d.transfer.encoder_info import read_encoder_info
from medssl3d.transfer.export import load_pretrained

BUNDLES = Path(__file__).resolve().parents[2] / "bundles"
# Every bundle but the segmentation one is a pretraining bundle named after its method, with the ids
# `backbone_size`, `roi_size`, `export_target`, `smoke_dir` and outputs under `smoke_dir/{runs,models}`.
QUICK_STEPS = 2
PRETRAIN_BUNDLES = sorted(p.parent.parent.name for p in BUNDLES.glob("*/configs/train.json"))
PRETRAIN_BUNDLES.remove("segmentation")


def configs(bundle: str, *names: str) -> list[str]:
    return [str(BUNDLES / bundle / "configs" / f"{n}.json") for n in names]


def smoke_target_network(bundle: str) -> tuple[str, torch.nn.Module]:
    """The MONAI network (and its export name) that the smoke run's exported encoder must fill."""
    parser = ConfigParser()
    parser.read_config(configs(bundle, "train", "smoke"))
    target, size, roi = (parser.get_parsed_content(k) for k in ("export_target", "backbone_size", "roi_size"))
    if target == "swinunetr":
        return target, SwinUNETR(in_channels=1, out_channels=2, feature_size=BACKBONE_SIZES["swin"][size].feature_size)
    vit = BACKBONE_SIZES["vit"][size]
    net = UNETR(
        in_channels=1, out_channels=2, img_size=roi,
        hidden_size=vit.hidden_size, mlp_dim=vit.mlp_dim, num_heads=vit.num_heads,
    )
    return target, net


@pytest.mark.parametrize("bundle", PRETRAIN_BUNDLES)
def test_bundle_files_and_metadata_are_valid(bundle):
    assert verify_bundle(BUNDLES / bundle) == []


@pytest.mark.slow
@pytest.mark.parametrize("bundle", PRETRAIN_BUNDLES)
def test_smoke_run_through_config_workflow(bundle, tmp_path):
    wf = ConfigWorkflow(
        config_file=configs(bundle, "train", "smoke"),
        meta_file=str(BUNDLES / bundle / "configs" / "metadata.json"),
        logging_file=False,
        workflow_type="train",
        bundle_root=str(BUNDLES / bundle),
        smoke_dir=str(tmp_path),
        # the torchrun test below runs the same overlay too: two single-volume steps keep the suite short
        **{"train#trainer#max_steps": QUICK_STEPS, "train#trainer#config#batch_size": 1},
    )
    wf.initialize()
    assert wf.check_properties() == []
    wf.run()
    wf.finalize()

    ckpt = load_checkpoint(tmp_path / "runs" / "checkpoints" / "last.pt")
    assert ckpt["method"] == bundle
    assert ckpt["step"] == wf.parser.get_parsed_content("train#trainer#max_steps")
    metrics = [json.loads(line) for line in (tmp_path / "runs" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    target, net = smoke_target_network(bundle)
    encoder = tmp_path / "models" / f"encoder_{target}.pt"
    report = load_pretrained(net, encoder)
    assert report.encoder_matched == report.encoder_total > 0
    # the encoder describes itself: what the segmentation bundle configures itself from
    info = read_encoder_info(encoder)
    method = wf.parser.get_parsed_content("method")
    assert (info["method"], info["export_target"], info["steps"]) == (bundle, target, ckpt["step"])
    assert info["source"] == method.default_export_source()
    assert info["roi_size"] == list(wf.parser.get_parsed_content("roi_size"))
    assert info["preset"]["modality"] == wf.parser.get_parsed_content("preset").modality
    described = ("steps", "source", "medssl3d_version", "teacher_start_share")
    assert ckpt["run_info"] == {k: v for k, v in info.items() if k not in described}
    # a teacher says how much of its untrained start it still holds (two steps of momentum 0.996 -> 1 keep most)
    if info["source"] == "teacher":
        assert 0.99 < info["teacher_start_share"] < 1.0
    else:
        assert "teacher_start_share" not in info


@pytest.mark.slow
@pytest.mark.parametrize("bundle", PRETRAIN_BUNDLES)
def test_torchrun_two_gloo_processes(bundle, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "monai.bundle", "run",
        "--config_file", str(configs(bundle, "train", "smoke", "multi_gpu_train")),
        "--smoke_dir", str(tmp_path),
        "--train#trainer#max_steps", str(QUICK_STEPS),
        "--train#trainer#config#batch_size", "1",
        "--train#trainer#config#num_workers", "0",
    ]
    done = subprocess.run(cmd, cwd=BUNDLES / bundle, env=env, capture_output=True, encoding="utf-8", timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ckpt = load_checkpoint(tmp_path / "runs" / "checkpoints" / "last.pt")
    assert ckpt["step"] == QUICK_STEPS
    assert (tmp_path / "models" / f"encoder_{smoke_target_network(bundle)[0]}.pt").is_file()


def initial_swin_encoder(bundle: str, smoke_dir: Path, seed: int) -> dict[str, torch.Tensor]:
    """The Swin weights ``bundle`` exports before any step, its network built with ``seed``."""
    wf = ConfigWorkflow(
        config_file=configs(bundle, "train", "smoke"),
        meta_file=str(BUNDLES / bundle / "configs" / "metadata.json"),
        logging_file=False, workflow_type="train", bundle_root=str(BUNDLES / bundle), smoke_dir=str(smoke_dir),
        seed=seed,
    )
    wf.initialize()
    encoder = wf.parser.get_parsed_content("export")
    wf.finalize()
    assert read_encoder_info(encoder)["steps"] == 0
    return {k: v for k, v in torch.load(encoder, weights_only=True)["state_dict"].items() if k.startswith("swinViT.")}


def test_the_seed_fixes_the_encoder_every_swin_bundle_starts_from(tmp_path):
    swin = [b for b in PRETRAIN_BUNDLES if smoke_target_network(b)[0] == "swinunetr"]
    assert len(swin) >= 3
    reference = initial_swin_encoder(swin[0], tmp_path / "first", seed=0)
    for bundle in swin[1:]:
        torch.rand(97)  # whatever ran before in the process does not change the start
        weights = initial_swin_encoder(bundle, tmp_path / bundle, seed=0)
        assert weights.keys() == reference.keys()
        assert all(torch.equal(weights[k], reference[k]) for k in reference), bundle
    other = initial_swin_encoder(swin[0], tmp_path / "other", seed=1)
    assert not torch.equal(other["swinViT.patch_embed.proj.weight"], reference["swinViT.patch_embed.proj.weight"])
