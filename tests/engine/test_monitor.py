import json
import logging

from medssl3d.engine import monitor as monitor_mod
from medssl3d.engine.monitor import METRICS_FILE, TB_DIR, TrainingMonitor


def test_log_lines_without_a_tty(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(monitor_mod.sys.stderr, "isatty", lambda: False, raising=False)
    mon = TrainingMonitor(tmp_path, total_steps=10, start_step=0)
    with caplog.at_level(logging.INFO, logger=monitor_mod.__name__):
        mon.update(5, 1.5)
        mon.record(5, 0, {"loss": 1.5, "opt/lr": 0.1}, samples_per_step=4)
    mon.close()
    assert mon.bar is None
    assert any("step 5/10 (50.0%)" in r.message and "steps/s" in r.message and "ETA" in r.message
               for r in caplog.records)
    record = json.loads((tmp_path / METRICS_FILE).read_text())
    assert record["step"] == 5 and record["opt/lr"] == 0.1
    assert record["perf/samples_per_s"] == record["perf/steps_per_s"] * 4
    assert list((tmp_path / TB_DIR).glob("events.out.tfevents.*"))


def test_progress_bar_on_a_tty(tmp_path, monkeypatch):
    monkeypatch.setattr(monitor_mod.sys.stderr, "isatty", lambda: True, raising=False)
    mon = TrainingMonitor(tmp_path, total_steps=10, start_step=2, tensorboard=False)
    mon.update(4, 0.5)
    assert mon.bar is not None and mon.bar.n == 4
    mon.close()


def test_disabled_monitor_writes_nothing(tmp_path):
    mon = TrainingMonitor(tmp_path / "x", total_steps=10, start_step=0, enabled=False)
    mon.update(1, 1.0)
    mon.record(1, 0, {"loss": 1.0}, 1)
    mon.close()
    assert not (tmp_path / "x").exists()
