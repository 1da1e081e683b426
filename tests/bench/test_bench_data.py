"""`medssl3d bench data`: the worker arithmetic, the suites, and one small run on phantoms."""

import json
import math

import pytest

from medssl3d.bench import data
from medssl3d.bench.suite import load_suite

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    ("items_per_step", "step_s", "items_per_s", "expected"),
    [
        (2, 1.0, 1.0, 2),     # a step a second eats 2 items; one worker makes 1
        (2, 10.0, 1.0, 1),    # slow steps: one worker is plenty
        (2, 0.5, 1.0, 4),
        (1, 1.0, 3.0, 1),
        (3, 1.0, 2.0, 2),     # 1.5 workers -> 2
    ],
)
def test_workers_needed_known_answers(items_per_step, step_s, items_per_s, expected):
    assert data.workers_needed(items_per_step, step_s, items_per_s) == expected


@pytest.mark.parametrize(("step_s", "items_per_s"), [(0.0, 1.0), (1.0, 0.0), (-1.0, 1.0)])
def test_workers_needed_rejects_non_positive(step_s, items_per_s):
    with pytest.raises(ValueError, match="must be > 0"):
        data.workers_needed(2, step_s, items_per_s)


@pytest.mark.parametrize("suite", ["smoke", "full"])
def test_suites_load_into_the_config(suite):
    cfg = load_suite(data.DataBenchConfig, "data", suite)
    assert set(cfg.methods) <= {"swin_ssl", "alice", "afire", "dira", "ace"}
    # ACE's crops are grid_n cells of token_stride voxels: they must be the suite's crop size
    ace = cfg.bundle_overrides.get("ace", {})
    if "grid_n" in ace:
        assert ace["grid_n"] * ace["token_stride"] == cfg.roi


@pytest.mark.parametrize(
    ("override", "message"),
    [("source=nowhere", "data source"), ("repeats=0", "repeats"), ("batch_size=21", "at least one batch")],
)
def test_bad_suite_values_are_refused(override, message):
    with pytest.raises(ValueError, match=message):
        load_suite(data.DataBenchConfig, "data", "smoke", [override])


def test_run_on_phantoms_writes_finite_figures(tmp_path):
    out = tmp_path / "data.json"
    path, table = data.run("smoke", out, [
        "source=phantoms", "methods=[swin_ssl]", "spacing_mm=3.0", "batch_size=1", "repeats=2",
        "views_per_repeat=1", "step_warmup=0", "step_repeats=1",
    ])
    assert path == out
    record = json.loads(out.read_text())
    assert record["kind"] == "data" and record["config"]["methods"] == ["swin_ssl"]
    (row,) = record["results"]
    for key in ("views_per_s", "view_s", "step_s", "steps_per_s", "view_to_step_ratio", "first_pass_s"):
        assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] > 0, key
    assert row["views_per_s_min"] <= row["views_per_s"] <= row["views_per_s_max"]
    assert row["workers_needed"] == data.workers_needed(1, row["step_s"], row["views_per_s"])
    assert row["views_per_step"] == 1 and row["volumes"] == 3
    assert "| swin_ssl |" in table and "workers needed" in table


def test_a_failing_method_becomes_an_error_row(tmp_path):
    path, table = data.run("smoke", tmp_path / "data.json", ["source=phantoms", "methods=[no_such_method]"])
    (row,) = json.loads(path.read_text())["results"]
    assert row["method"] == "no_such_method" and "no pretraining bundle" in row["error"]
    assert "| no_such_method |" in table and "error" in table


def _step_record(path, size="tiny", roi=64, batch_size=1, rows=({"name": "swin_ssl", "step_s": 0.25},)):
    config = {"size": size, "roi": [roi] * 3, "batch_size": batch_size, "device": "cuda"}
    path.write_text(json.dumps({"kind": "step", "config": config, "results": list(rows)}))
    return path


PHANTOM_RUN = ["source=phantoms", "spacing_mm=3.0", "batch_size=1", "repeats=2", "views_per_repeat=1"]


def test_step_times_from_a_step_record_give_that_devices_workers(tmp_path):
    record = _step_record(tmp_path / "step.json", rows=[{"name": "swin_ssl", "step_s": 0.25}, {"name": "afire"}])
    path, table = data.run("smoke", tmp_path / "data.json", [
        *PHANTOM_RUN, "methods=[swin_ssl,afire]", f"step_record={record}",
    ])
    measured, missing = json.loads(path.read_text())["results"]
    assert measured["step_s"] == 0.25 and measured["step_source"] == f"{record} (cuda)"
    assert measured["workers_needed"] == data.workers_needed(1, 0.25, measured["views_per_s"])
    assert missing["method"] == "afire" and "no step time of 'afire'" in missing["error"]
    assert f"Step times from {record} (on cuda)" in table


@pytest.mark.parametrize("record", [{"size": "base"}, {"roi": 96}, {"batch_size": 2}])
def test_a_step_record_of_another_size_crop_or_batch_is_refused(tmp_path, record):
    path = _step_record(tmp_path / "step.json", **record)
    with pytest.raises(ValueError, match="this suite needs"):
        data.run("smoke", tmp_path / "data.json", [*PHANTOM_RUN, "methods=[swin_ssl]", f"step_record={path}"])
