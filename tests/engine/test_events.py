import json

import pytest
import torch
from _engine_toy import BlobVolumes, ToyMethod

from medssl3d.engine.events import Events
from medssl3d.engine.trainer import Pretrainer

FAST = dict(batch_size=2, tensorboard=False, resume=None)


class Recorder:
    """Records (event, step) pairs and logs one scalar at chosen steps."""

    def __init__(self, log_at=()):
        self.calls, self.log_at = [], set(log_at)

    def attach(self, trainer):
        trainer.add_event_handler(Events.STARTED, lambda t: self.calls.append(("started", t.step)))
        trainer.add_event_handler(Events.COMPLETED, lambda t: self.calls.append(("completed", t.step)))
        trainer.add_event_handler("iteration_completed", self.on_iteration)

    def on_iteration(self, trainer):
        self.calls.append(("iteration", trainer.step))
        if trainer.step in self.log_at:
            trainer.log_scalars({"custom/value": trainer.step * 10})


def test_events_fire_in_order_and_scalars_join_the_step_record(tmp_path):
    torch.manual_seed(0)
    recorder = Recorder(log_at={3})
    trainer = Pretrainer(ToyMethod(), BlobVolumes(n=8), max_steps=4, log_every=2, out_dir=tmp_path,
                         handlers=[recorder, None], **FAST)
    trainer.run(until_step=3)
    trainer.run()
    assert recorder.calls == [("started", 0), ("iteration", 1), ("iteration", 2), ("iteration", 3),
                              ("completed", 3), ("started", 3), ("iteration", 4), ("completed", 4)]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 3, 4]  # 3 is the until_step end and the handler's step
    assert records[1]["custom/value"] == 30 and "loss" in records[1]
    assert all("custom/value" not in r for r in records[::2])


def test_log_scalars_outside_an_iteration_handler_raises(tmp_path):
    def log_at_start(trainer):
        trainer.log_scalars({"x": 1.0})

    trainer = Pretrainer(ToyMethod(), BlobVolumes(n=4), max_steps=1, out_dir=tmp_path, **FAST)
    trainer.add_event_handler(Events.STARTED, log_at_start)
    with pytest.raises(RuntimeError, match="ITERATION_COMPLETED"):
        trainer.run()


def test_bad_handlers_and_events_raise(tmp_path):
    with pytest.raises(ValueError, match="attach"):
        Pretrainer(ToyMethod(), BlobVolumes(n=4), max_steps=1, out_dir=tmp_path, handlers=[object()], **FAST)
    trainer = Pretrainer(ToyMethod(), BlobVolumes(n=4), max_steps=1, out_dir=tmp_path, **FAST)
    with pytest.raises(ValueError, match="unknown event"):
        trainer.add_event_handler("epoch_completed", print)
