"""The segmentation bundle under real ``torchrun`` (2 gloo processes on the CPU): data sharding and saved weights."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor

from medssl3d.bundle_support.rank_record import case_names

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "segmentation"
WORLD_SIZE = 2
# the overlay order of the documented command: multi-GPU settings, then the smoke sizes and phantom data
CONFIGS = "['configs/train.json','configs/multi_gpu_train.json','configs/smoke.json']"
# one epoch: 2 training phantoms, one per rank, then validation and the checkpoint on rank 0
EPOCHS = 1


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    """Run the documented torchrun command from a copy of the bundle; returns the copy's root."""
    bundle = tmp_path_factory.mktemp("ddp") / "segmentation"
    shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("smoke", "models", "eval", "__pycache__"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update({"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore"})
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD_SIZE),
         "-m", "monai.bundle", "run", "--config_file", CONFIGS, "--train#trainer#max_epochs", str(EPOCHS)],
        cwd=bundle, env=env, capture_output=True, encoding="utf-8", timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return bundle


def smoke_network(bundle: Path) -> torch.nn.Module:
    """The plain (non-DDP) network of train.json + smoke.json."""
    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / f"{n}.json") for n in ("train", "smoke")])
    parser.update({"bundle_root": str(bundle)})
    return parser.get_parsed_content("network_def")


@pytest.mark.slow
def test_each_rank_trained_on_its_own_cases(ddp_run):
    datalist = json.loads((ddp_run / "smoke" / "data" / "dataset.json").read_text())
    training = {str(ddp_run / "smoke" / "data" / case["image"]) for case in datalist["training"]}
    assert len(training) == WORLD_SIZE  # one case per rank: the shards cannot overlap through padding
    records = [json.loads((ddp_run / "smoke" / "eval" / f"rank{r}_cases.json").read_text()) for r in range(WORLD_SIZE)]
    assert [(rec["rank"], rec["world_size"]) for rec in records] == [(r, WORLD_SIZE) for r in range(WORLD_SIZE)]
    for epoch in map(str, range(1, EPOCHS + 1)):
        seen = [set(rec["epochs"][epoch]) for rec in records]
        assert all(len(cases) == 1 for cases in seen), seen
        assert seen[0].isdisjoint(seen[1]), seen
        assert set.union(*seen) == training, seen


@pytest.mark.slow
def test_saved_weights_load_strictly_into_the_plain_network(ddp_run):
    saved = sorted((ddp_run / "smoke" / "models").glob("*.pt"))  # model.pt and the resume checkpoint
    assert "model.pt" in {p.name for p in saved}
    network = smoke_network(ddp_run)
    for path in saved:
        state = torch.load(path, map_location="cpu", weights_only=True)
        # the resume checkpoint holds the network beside the optimizer, scheduler and trainer states
        weights = state if path.name == "model.pt" else state["network"]
        assert not [k for k in weights if k.startswith("module.")]
        network.load_state_dict(weights, strict=True)


def test_case_names_of_decollated_and_collated_batches():
    def image(*names):
        return MetaTensor(torch.zeros(len(names), 1, 2, 2, 2), meta={"filename_or_obj": list(names)})

    decollated = [{"image": MetaTensor(torch.zeros(1, 2, 2, 2), meta={"filename_or_obj": n})} for n in ("a", "b")]
    assert case_names(decollated) == ["a", "b"]
    assert case_names({"image": image("c", "d")}) == ["c", "d"]
    with pytest.raises(ValueError, match="filename_or_obj"):
        case_names([{"image": torch.zeros(1, 2, 2, 2)}])
    with pytest.raises(ValueError, match="'img'"):
        case_names(decollated, image_key="img")
