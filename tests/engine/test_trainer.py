import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _engine_toy import BlobVolumes, GanToy, Jitter, LinearToy, OtherToyMethod, ToyMethod

from medssl3d.engine.checkpoint import load_checkpoint
from medssl3d.engine.trainer import Pretrainer, TrainConfig

HERE = Path(__file__).parent
FAST = dict(batch_size=2, log_every=1, tensorboard=False, deterministic=True)


def _toy(seed=0, **kwargs):
    torch.manual_seed(seed)
    return ToyMethod(**kwargs)


def _scramble_rngs():
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)


@pytest.mark.parametrize("split", [3, 4])  # mid-epoch and on the epoch boundary (4 batches/epoch)
def test_resume_is_exact(tmp_path, split):
    data = BlobVolumes(n=8, transform=Jitter())
    full = Pretrainer(_toy(), data, max_steps=6, out_dir=tmp_path / "a", resume=None, **FAST).run()

    first = Pretrainer(_toy(), data, max_steps=6, out_dir=tmp_path / "b", **FAST).run(until_step=split)
    assert first["step"] == split and Path(first["checkpoint"]).exists()
    _scramble_rngs()
    second = Pretrainer(_toy(seed=7), data, max_steps=6, out_dir=tmp_path / "b", **FAST).run()
    assert second["start_step"] == split and second["step"] == 6
    assert second["resumed_from"] == first["checkpoint"]
    assert not torch.are_deterministic_algorithms_enabled()
    np.testing.assert_allclose(first["loss_history"] + second["loss_history"], full["loss_history"],
                               rtol=0, atol=1e-6)


def test_run_continues_in_the_same_object(tmp_path):
    data = BlobVolumes(n=8, transform=Jitter())
    full = Pretrainer(_toy(), data, max_steps=6, out_dir=tmp_path / "a", **FAST).run()
    trainer = Pretrainer(_toy(), data, max_steps=6, out_dir=tmp_path / "b", **FAST)
    first, second = trainer.run(until_step=3), trainer.run()
    assert second["start_step"] == 3 and second["resumed_from"] is None
    np.testing.assert_allclose(first["loss_history"] + second["loss_history"], full["loss_history"],
                               rtol=0, atol=1e-6)


def test_summary_schedules_and_logs(tmp_path):
    trainer = Pretrainer(_toy(), BlobVolumes(n=8), config={"max_epochs": 2, "warmup_steps": 2, "lr": 1e-3,
                         "out_dir": str(tmp_path), "batch_size": 4, "log_every": 2})
    summary = trainer.run()
    assert summary["total_steps"] == summary["step"] == 4 and summary["epoch"] == 2
    assert np.isfinite(summary["final_loss"]) and "ce" in summary["final_parts"]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert records[0]["opt/lr"] == pytest.approx(5e-4)  # step index 1 of a 2-step warm-up from 0
    assert records[0]["opt/ema_momentum"] == pytest.approx(0.996 + 0.004 * (1 - np.cos(np.pi / 4)) / 2)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["step"] == 4 and ckpt["method"] == "toy" and ckpt["config"]["max_epochs"] == 2
    assert "teacher.backbone.0.weight" in ckpt["model"] and "centre" in ckpt["model"]


def test_teacher_follows_student_and_gets_no_gradients(tmp_path):
    method = _toy()
    Pretrainer(method, BlobVolumes(n=4), max_steps=2, out_dir=tmp_path, ema_momentum=(0.5, 0.5), **FAST).run()
    assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())
    assert not method.teacher.training and method.training
    fresh = _toy()
    pairs = zip(method.teacher.parameters(), fresh.teacher.parameters(), strict=True)
    assert all(not torch.equal(a, b) for a, b in pairs)


def test_teacher_start_share_is_the_weight_its_start_keeps(tmp_path):
    method = _toy()
    with torch.no_grad():  # a teacher that starts at zero, and a student that lr = 1e-30 keeps where it is (fp32)
        for p in method.teacher.parameters():
            p.zero_()
    trainer = Pretrainer(method, BlobVolumes(n=6), max_steps=3, out_dir=tmp_path, ema_momentum=(0.9, 0.99),
                         lr=1e-30, min_lr=0.0, **FAST)
    assert trainer.teacher_start_share() == 1.0
    trainer.run()
    share = trainer.teacher_start_share()
    # momenta of steps 0, 1, 2 on the half-cosine from 0.9 to 0.99 over 3 steps
    assert share == pytest.approx(np.prod([0.99 - 0.09 * (1 + np.cos(np.pi * s / 3)) / 2 for s in range(3)]))
    # the teacher is share * start (zero) + (1 - share) * student
    for student, teacher in zip(method.student.parameters(), method.teacher.parameters(), strict=True):
        torch.testing.assert_close(teacher, (1 - share) * student)
    assert Pretrainer(LinearToy(), BlobVolumes(n=4), max_steps=1, out_dir=tmp_path / "s", **FAST
                      ).teacher_start_share() is None


def test_nan_guard_keeps_last_checkpoint(tmp_path):
    method = _toy(nan_at_step=3)
    trainer = Pretrainer(method, BlobVolumes(n=8), max_steps=6, ckpt_every=2, out_dir=tmp_path, **FAST)
    expected = r"non-finite loss at step 3.*ce.*last good checkpoint: .*last\.pt"
    with pytest.raises(FloatingPointError, match=expected):
        trainer.run()
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert all(torch.isfinite(p).all() for p in method.parameters())  # nothing was stepped
    assert not torch.are_deterministic_algorithms_enabled()  # not left switched on


def test_refuses_checkpoint_of_another_method(tmp_path):
    Pretrainer(_toy(), BlobVolumes(n=4), max_steps=1, out_dir=tmp_path, **FAST).run()
    other = Pretrainer(OtherToyMethod(), BlobVolumes(n=4), max_steps=2, out_dir=tmp_path, **FAST)
    with pytest.raises(ValueError, match="written by method 'toy' but this run trains method 'other-toy'"):
        other.run()


def test_accumulation_matches_the_larger_batch(tmp_path):
    data = BlobVolumes(n=2)
    grads = []
    for bs, acc in ((2, 1), (1, 2)):
        torch.manual_seed(0)
        method = LinearToy()
        loader = torch.utils.data.DataLoader(data, batch_size=bs)
        Pretrainer(method, loader, max_steps=1, accumulate_steps=acc, clip_grad=None,
                   out_dir=tmp_path / str(bs), tensorboard=False).run()
        grads.append(method.student.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_auxiliary_optimizer_trains_only_its_module_and_is_checkpointed(tmp_path):
    torch.manual_seed(0)
    method = GanToy()
    critic_before = [p.clone() for p in method.critic.parameters()]
    summary = Pretrainer(method, BlobVolumes(n=4), max_steps=2, out_dir=tmp_path, **FAST).run()
    assert "critic/loss" in summary["final_parts"] and "adv" in summary["final_parts"]
    assert not all(torch.equal(a, b) for a, b in zip(critic_before, method.critic.parameters(), strict=True))
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert set(ckpt["auxiliary"]) == {"critic"}
    main_ids = {p for g in ckpt["optimizer"]["param_groups"] for p in g["params"]}
    n_main = sum(1 for p in method.parameters() if p.requires_grad) - 2  # critic weight + bias
    assert len(main_ids) == n_main


def test_freeze_last_layer(tmp_path):
    method = _toy()
    head_before = [p.clone() for p in method.student.head.parameters()]
    Pretrainer(method, BlobVolumes(n=4), max_steps=2, freeze_last_layer_steps=2, out_dir=tmp_path,
               **FAST).run()
    assert all(torch.equal(a, b) for a, b in zip(head_before, method.student.head.parameters(), strict=True))


def test_freeze_last_layer_epochs_counts_the_process_epoch(tmp_path):
    method = _toy()
    head_before = [p.clone() for p in method.student.head.parameters()]
    trainer = Pretrainer(method, BlobVolumes(n=4), max_steps=3, freeze_last_layer_epochs=1, out_dir=tmp_path,
                         **FAST)
    trainer.run(until_step=2)  # one epoch: 4 volumes, batch 2
    assert trainer.steps_per_epoch == 2 and trainer.frozen_last_layer_steps == 2
    assert all(torch.equal(a, b) for a, b in zip(head_before, method.student.head.parameters(), strict=True))
    trainer.run()
    assert not all(torch.equal(a, b) for a, b in zip(head_before, method.student.head.parameters(), strict=True))


def test_step_info_numbers_the_micro_batches(tmp_path):
    class Recording(ToyMethod):
        def forward(self, batch, step):
            self.calls.append((step.step, step.micro_batch))
            return super().forward(batch, step)

    torch.manual_seed(0)
    method = Recording()
    method.calls = []
    Pretrainer(method, BlobVolumes(n=8), max_steps=2, accumulate_steps=3, batch_size=1, log_every=1,
               tensorboard=False, out_dir=tmp_path).run()
    assert method.calls == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]


def test_config_validation_and_bundle_construction(tmp_path):
    with pytest.raises(ValueError, match="max_steps or max_epochs"):
        TrainConfig()
    with pytest.raises(ValueError, match="unknown TrainConfig keys"):
        Pretrainer(_toy(), BlobVolumes(), config={"max_steps": 1, "learning_rate": 1})
    with pytest.raises(ValueError, match="fp16"):
        Pretrainer(_toy(), BlobVolumes(), max_steps=1, precision="fp16", device="cpu")

    from monai.bundle import ConfigParser

    parser = ConfigParser({
        "method": {"_target_": "_engine_toy.ToyMethod"},
        "dataset": {"_target_": "_engine_toy.BlobVolumes", "n": 4},
        "trainer": {"_target_": "medssl3d.engine.trainer.Pretrainer", "method": "@method",
                    "train_loader": "@dataset", "config": {"weight_decay": [0.04, 0.4], "batch_size": 2,
                                                           "out_dir": str(tmp_path), "tensorboard": False},
                    "max_epochs": 1},
    })
    trainer = parser.get_parsed_content("trainer")
    assert trainer.config.max_epochs == 1 and trainer.config.weight_decay == (0.04, 0.4)
    assert trainer.run()["step"] == 2


def _wait_for(path, proc, timeout=120):
    t0 = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc {proc.returncode}) before a checkpoint appeared")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError("no checkpoint appeared")
        time.sleep(0.02)


def _step_losses(metrics):
    losses = {}
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by SIGKILL
            continue
        losses.setdefault(record["step"], []).append(record["loss"])
    return losses


def test_sigkill_then_resume_in_a_new_process(tmp_path):
    script = str(HERE / "_engine_toy_run.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    args = [sys.executable, script, str(tmp_path), "30", "2"]
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(args + ["0.05"], env=env, stdout=log, stderr=subprocess.STDOUT)
        _wait_for(tmp_path / "checkpoints" / "last.pt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    saved_step = load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"]
    assert 2 <= saved_step < 30 and saved_step % 2 == 0
    reached = max(_step_losses(tmp_path / "metrics.jsonl"))

    done = subprocess.run(args + ["0"], env=env, capture_output=True, encoding="utf-8", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary_rank0.json").read_text())
    assert summary["start_step"] == saved_step and summary["step"] == 30
    assert len(summary["loss_history"]) == 30 - saved_step  # lost only the steps after the checkpoint
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 30
    # Steps the killed run took after its checkpoint are repeated with the same losses.
    for step, values in _step_losses(tmp_path / "metrics.jsonl").items():
        if saved_step < step <= reached:
            assert len(values) == 2 and abs(values[0] - values[1]) < 1e-6


def test_bf16_autocast_on_cpu(tmp_path):
    method = _toy()
    summary = Pretrainer(method, BlobVolumes(n=4), max_steps=2, precision="bf16", out_dir=tmp_path,
                         batch_size=2, tensorboard=False).run()
    assert np.isfinite(summary["final_loss"])
    assert all(p.dtype == torch.float32 for p in method.parameters())  # autocast, not a cast of the weights


def test_compiled_backbone_trains_like_the_plain_one(tmp_path):
    # "eager" runs the real torch.compile path (Dynamo tracing, guards, in-place module compile) without
    # generating kernels, so the losses must match the plain run exactly and the checkpoint keys stay the same.
    data = BlobVolumes(n=8, transform=Jitter())
    plain = Pretrainer(_toy(), data, max_steps=3, out_dir=tmp_path / "a", **FAST).run()
    method = _toy()
    compiled = Pretrainer(method, data, max_steps=3, out_dir=tmp_path / "b", compile_backend="eager", **FAST).run()
    assert method.student.backbone._compiled_call_impl is not None
    np.testing.assert_allclose(compiled["loss_history"], plain["loss_history"], rtol=0, atol=1e-6)
    keys = set(load_checkpoint(compiled["checkpoint"])["model"])
    assert keys == set(load_checkpoint(plain["checkpoint"])["model"])
    with pytest.raises(ValueError, match="compile_backend"):
        TrainConfig(max_steps=1, compile_backend="")
