import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from medssl3d.engine import distributed
from medssl3d.engine.checkpoint import load_checkpoint

HERE = Path(__file__).parent


def test_helpers_are_no_ops_without_a_process_group():
    t = torch.tensor([1.0, 3.0])
    assert distributed.all_reduce_mean(t) is t and t.tolist() == [1.0, 3.0]
    assert not distributed.is_dist() and distributed.rank() == 0 and distributed.world_size() == 1
    assert distributed.all_gather_objects({"a": 1}) == [{"a": 1}]
    p = nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 2.0)
    distributed.all_reduce_grads([p])
    distributed.broadcast_module(nn.Linear(2, 2))
    distributed.barrier()
    assert p.grad.tolist() == [2.0, 2.0]


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "_engine_toy_run.py"), str(tmp_path), "4", "100", "0"]
    done = subprocess.run(cmd, env=env, capture_output=True, encoding="utf-8", timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    seen = [json.loads((tmp_path / f"seen_rank{r}.json").read_text()) for r in range(2)]
    # 8 samples, 2 ranks, batch 2: each rank sees its 4-sample shard once per epoch (4 steps = 2 epochs).
    assert len(seen[0]) == len(seen[1]) == 8
    assert not set(seen[0][:4]) & set(seen[1][:4])
    assert set(seen[0][:4]) | set(seen[1][:4]) == set(range(8))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.pt"]
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["step"] == 4 and ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    summaries = [json.loads((tmp_path / f"summary_rank{r}.json").read_text()) for r in range(2)]
    assert summaries[0]["step"] == summaries[1]["step"] == 4
    # Different data on each rank, yet the same weights: gradients, teacher and centre were synchronised.
    # BatchNorm running statistics stay per rank until DDP broadcasts rank 0's at the next forward.
    params = [json.loads((tmp_path / f"params_rank{r}.json").read_text()) for r in range(2)]
    assert params[0].keys() == params[1].keys()
    synced = [k for k in params[0] if "running_" not in k]
    assert len(synced) > 8 and "centre" in synced
    assert all(params[0][k] == pytest.approx(params[1][k], rel=1e-6, abs=1e-6) for k in synced)
