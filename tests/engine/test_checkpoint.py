import random

import numpy as np
import pytest
import torch

from medssl3d.engine import checkpoint as ckpt_mod
from medssl3d.engine.checkpoint import (
    FORMAT_VERSION,
    CheckpointManager,
    check_compatible,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def _state(step, **extra):
    return {"format_version": FORMAT_VERSION, "method": "toy", "backbone": "toy-conv", "step": step,
            "model": {"w": torch.full((3,), float(step))}, **extra}


def test_roundtrip_with_rng_state_under_weights_only(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    path = save_checkpoint(_state(1, rng=[rng_state()]), tmp_path / "a.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1))
    loaded = load_checkpoint(path)  # weights_only=True inside
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    set_rng_state(loaded["rng"][0])
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(1), expected[2])


def test_failure_during_save_leaves_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(_state(1), path)
    real_save = torch.save

    def broken_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.seek(10)
        f.truncate()
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(_state(2), path)
    assert load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temp file left


def test_manager_keeps_last_and_every_n(tmp_path):
    manager = CheckpointManager(tmp_path, keep_every=2)
    for step in (1, 2, 3):
        manager.save(_state(step), step)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "step_00000002.pt"]
    assert load_checkpoint(manager.last)["step"] == 3
    assert load_checkpoint(tmp_path / "step_00000002.pt")["step"] == 2


def test_refuses_other_method_and_backbone(tmp_path):
    ckpt = _state(1)
    check_compatible(ckpt, "toy", "toy-conv", "x.pt")
    with pytest.raises(ValueError, match=r"x\.pt.*method 'toy'.*method 'alice'"):
        check_compatible(ckpt, "alice", "toy-conv", "x.pt")
    with pytest.raises(ValueError, match=r"backbone 'toy-conv'.*backbone 'swin-tiny'"):
        check_compatible(ckpt, "toy", "swin-tiny", "x.pt")


def test_unreadable_and_foreign_files(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt"):
        load_checkpoint(bad)
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a medssl3d training checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")
