"""`medssl3d bench transfer`: aggregation on known numbers, task splits and crops, one small run on phantoms."""

import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch

from medssl3d.bench import transfer
from medssl3d.bench.figure import plot_budget_curve, plot_transfer
from medssl3d.bench.finetune import network_overrides
from medssl3d.bench.pretrain import weight_change
from medssl3d.bench.suite import load_suite
from medssl3d.bench.tasks import UNIT_CROP, UNIT_VOLUME, Task, normalise, split_subject, training_units
from medssl3d.transfer.encoder_info import read_encoder_info

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _run(method, seed, dice, brain, k=1, task="t"):
    return {"task": task, "method": method, "k": k, "seed": seed, "unit": "volume", "dice": dice,
            "dice_brain": brain}


def test_aggregate_mean_sd_and_paired_difference():
    runs = [
        _run("scratch", 0, 0.5, 0.5), _run("scratch", 1, 0.7, 0.7),
        _run("m", 1, 0.9, 0.9), _run("m", 0, 0.6, "absent"),
    ]
    scratch, m = transfer.aggregate(runs)
    assert scratch["method"] == "scratch" and scratch["n_seeds"] == 2
    assert scratch["dice"] == pytest.approx(0.6)
    assert scratch["dice_sd"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert "diff" not in scratch and "diff_text" not in scratch
    assert m["dice"] == pytest.approx(0.75)
    assert m["dice_sd"] == pytest.approx(np.std([0.6, 0.9], ddof=1))
    # paired by seed: (0.6 - 0.5, 0.9 - 0.7)
    assert m["diff"] == pytest.approx(0.15)
    assert m["diff_sd"] == pytest.approx(np.std([0.1, 0.2], ddof=1))
    assert m["n_pairs"] == 2
    # a class without a Dice value in one seed is averaged over the others
    assert m["dice_brain"] == pytest.approx(0.9) and "dice_brain_sd" not in m
    # 95 % t-interval of two paired differences: 12.706 * sd / sqrt(2)
    assert m["diff_ci95"] == pytest.approx(12.706 * np.std([0.1, 0.2], ddof=1) / math.sqrt(2))
    assert m["dice_text"] == "0.750 ± 0.212" and m["diff_text"] == "+0.150 ± 0.071 (95 % CI -0.485 … +0.785)"


def test_ci95_uses_student_t_and_is_conservative_between_table_rows():
    assert transfer.ci95_half_width(1.0, 4) == pytest.approx(3.182 / 2)
    assert transfer.ci95_half_width(1.0, 12) == pytest.approx(2.228 / math.sqrt(12))  # 11 dof: the 10-dof t
    assert transfer.ci95_half_width(1.0, 100) == pytest.approx(1.95996 / 10, rel=1e-4)
    with pytest.raises(ValueError, match="at least 2"):
        transfer.ci95_half_width(1.0, 1)


def test_runs_of_other_budgets_are_other_groups_paired_within_their_budget():
    runs = [{**_run("scratch", 0, 0.2, 0.2), "steps": 4}, {**_run("m", 0, 0.5, 0.5), "steps": 4},
            {**_run("scratch", 0, 0.6, 0.6), "steps": 16}, {**_run("m", 0, 0.7, 0.7), "steps": 16}]
    rows = {(r["method"], r["steps"]): r for r in transfer.aggregate(runs)}
    assert rows[("m", 4)]["diff"] == pytest.approx(0.3) and rows[("m", 16)]["diff"] == pytest.approx(0.1)


def test_aggregate_pairs_only_shared_seeds_and_keeps_groups_apart():
    runs = [_run("scratch", 0, 0.5, 0.5), _run("m", 0, 0.4, 0.4), _run("m", 1, 0.8, 0.8),
            _run("scratch", 0, 0.2, 0.2, k=2), _run("m", 0, 0.3, 0.3, k=2)]
    rows = {(r["method"], r["k"]): r for r in transfer.aggregate(runs)}
    assert rows[("m", 1)]["n_pairs"] == 1 and rows[("m", 1)]["diff"] == pytest.approx(-0.1)
    assert "diff_sd" not in rows[("m", 1)]
    assert rows[("m", 2)]["diff"] == pytest.approx(0.1) and rows[("m", 2)]["n_seeds"] == 1
    assert "dice_sd" not in rows[("m", 2)] and rows[("m", 2)]["dice_text"] == "0.300"


def test_summary_table_has_one_section_per_task():
    runs = [_run("scratch", 0, 0.5, 0.5, task="a"), _run("m", 0, 0.6, 0.6, task="a"),
            _run("scratch", 0, 0.1, 0.1, task="b")]
    table = transfer.summary_table(transfer.aggregate(runs), {"a": ["brain"], "b": ["brain"]})
    assert table.index("### a") < table.index("### b")
    assert "| m | 1 | 1 | 0.600 | +0.100 | scratch | 0.600 |" in table


@pytest.mark.parametrize("suite", ["smoke", "cpu", "full"])
def test_suites_load_into_the_config(suite):
    cfg = load_suite(transfer.TransferBenchConfig, "transfer", suite)
    assert "scratch" not in cfg.methods and min(cfg.ks) >= 1 and cfg.seeds
    ace = cfg.bundle_overrides.get("ace", {})
    if "grid_n" in ace:
        assert ace["grid_n"] * ace["token_stride"] == cfg.roi


@pytest.mark.parametrize("arm", ["scratch", "init"])
def test_an_arm_in_methods_is_refused(arm):
    with pytest.raises(ValueError, match="arms of the benchmark"):
        load_suite(transfer.TransferBenchConfig, "transfer", "smoke", [f"methods=[{arm}]"])


def test_aggregate_pairs_a_method_with_its_control_arm_too():
    runs = [{**_run(m, seed, dice, dice), "reference": "scratch", **({"control": "init"} if m == "m" else {})}
            for m, seed, dice in [("scratch", 0, 0.5), ("scratch", 1, 0.6), ("init", 0, 0.55), ("init", 1, 0.75),
                                  ("m", 0, 0.62), ("m", 1, 0.7)]]
    rows = {r["method"]: r for r in transfer.aggregate(runs)}
    assert rows["m"]["diff"] == pytest.approx(0.11) and rows["m"]["reference"] == "scratch"
    # paired by seed: (0.62 - 0.55, 0.7 - 0.75)
    assert rows["m"]["control"] == "init" and rows["m"]["control_diff"] == pytest.approx(0.01)
    assert rows["m"]["control_diff_sd"] == pytest.approx(np.std([0.07, -0.05], ddof=1))
    assert rows["m"]["control_n_pairs"] == 2 and rows["m"]["control_diff_text"].startswith("+0.010 ± 0.085")
    assert rows["init"]["diff"] == pytest.approx(0.1) and "control" not in rows["init"]
    table = transfer.summary_table(list(rows.values()), {"t": ["brain"]})
    assert "Δ vs initial encoder" in table and "| +0.010 ± 0.085 (95 % CI" in table


def test_weight_change_is_relative_over_weight_matrices(tmp_path):
    index = torch.arange(16).reshape(4, 4) * 100  # an integer buffer, like Swin's relative position index
    start = {"w": torch.ones(2, 2), "bias": torch.zeros(2), "only_here": torch.ones(3, 3), "index": index}
    moved = {"w": torch.ones(2, 2) + torch.tensor([[0.5, 0.5], [0.5, 0.5]]), "bias": torch.ones(2), "index": index}
    torch.save({"state_dict": start}, tmp_path / "start.pt")
    torch.save({"state_dict": moved}, tmp_path / "moved.pt")
    # only "w" counts: |0.5 * 4| / |1 * 4| in L2 = 0.5; the bias, the integer buffer and a tensor of one file are
    # left out
    assert weight_change(tmp_path / "moved.pt", tmp_path / "start.pt") == pytest.approx(0.5)
    torch.save({"state_dict": {"bias": torch.ones(2)}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="share no weight matrix"):
        weight_change(tmp_path / "other.pt", tmp_path / "start.pt")


def test_network_follows_the_encoder():
    swin = network_overrides("swinunetr", "tiny", 64)
    assert (swin["arch"], swin["backbone_size"], swin["roi_size"]) == ("swinunetr", "tiny", [64, 64, 64])
    unetr = network_overrides("unetr", "small", 96)
    assert (unetr["arch"], unetr["backbone_size"], unetr["roi_size"]) == ("unetr", "small", [96, 96, 96])
    with pytest.raises(ValueError, match="'huge'"):
        network_overrides("unetr", "huge", 96)
    with pytest.raises(ValueError, match="basicunet"):
        network_overrides("basicunet", "tiny", 64)


def _subject(tmp_path, shape=(40, 24, 20)):
    """A labelled subject: two labelled blocks per hemisphere, an intensity ramp, a shifted affine."""
    image = np.linspace(0, 500, np.prod(shape), dtype=np.float32).reshape(shape)
    label = np.zeros(shape, np.uint8)
    label[4:16, 6:18, 5:15] = 1
    label[24:36, 6:18, 5:15] = 2
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = (-40.0, -24.0, -20.0)
    paths = {"image": tmp_path / "s_image.nii.gz", "label": tmp_path / "s_label.nii.gz"}
    nib.save(nib.Nifti1Image(image, affine), paths["image"])
    nib.save(nib.Nifti1Image(label, affine), paths["label"])
    return {"case": "s", **{k: str(v) for k, v in paths.items()}}, image, label, affine


def test_split_subject_cuts_at_the_labelled_middle(tmp_path):
    entry, image, label, affine = _subject(tmp_path)
    train, test = split_subject(entry, tmp_path / "split")
    halves = {name: (nib.load(e["image"]), nib.load(e["label"])) for name, e in (("train", train), ("test", test))}
    cut = (4 + 35 + 1) // 2
    assert halves["train"][1].shape == (cut, 24, 20) and halves["test"][1].shape == (40 - cut, 24, 20)
    np.testing.assert_array_equal(np.asarray(halves["train"][1].dataobj), label[:cut])
    np.testing.assert_array_equal(np.asarray(halves["test"][1].dataobj), label[cut:])
    # the world position of each voxel is kept
    np.testing.assert_allclose(halves["test"][0].affine[:3, 3], affine[:3, 3] + affine[:3, 0] * cut)
    # intensities normalised on the whole volume, before cutting
    whole = normalise(image)
    np.testing.assert_allclose(np.asarray(halves["test"][0].dataobj), whole[cut:], atol=1e-6)
    assert whole.min() == 0.0 and whole.max() == 1.0


def test_crops_are_labelled_sized_and_nested(tmp_path):
    entry, *_ = _subject(tmp_path)
    task = Task("t", UNIT_CROP, {"0": "background", "1": "a", "2": "b"}, (entry,), (), ())
    assert task.max_k is None and task.class_names == ["a", "b"]
    two = training_units(task, 2, seed=3, out_dir=tmp_path / "a", crop_mm=16.0)
    one = training_units(task, 1, seed=3, out_dir=tmp_path / "b", crop_mm=16.0)
    other = training_units(task, 1, seed=4, out_dir=tmp_path / "c", crop_mm=16.0)
    arrays = [np.asarray(nib.load(u["label"]).dataobj) for u in (*two, *one, *other)]
    assert all(a.shape == (8, 8, 8) for a in arrays)  # 16 mm at 2 mm
    np.testing.assert_array_equal(arrays[0], arrays[2])  # k=1 is the first crop of k=2
    assert not np.array_equal(nib.load(one[0]["image"]).affine, nib.load(other[0]["image"]).affine)
    assert all((a > 0).any() for a in arrays)


def test_volume_units_are_nested_and_bounded():
    entries = tuple({"case": f"c{i}", "image": f"i{i}", "label": f"l{i}"} for i in range(3))
    task = Task("t", UNIT_VOLUME, {"0": "background", "1": "a"}, entries, (), ())
    assert task.max_k == 3
    for seed in range(4):
        assert training_units(task, 2, seed, "unused", 1.0)[:1] == training_units(task, 1, seed, "unused", 1.0)
    # every block of 3 seeds labels each volume once as the single one
    for block in range(3):
        firsts = [training_units(task, 1, seed, "unused", 1.0)[0]["case"] for seed in range(3 * block, 3 * block + 3)]
        assert sorted(firsts) == ["c0", "c1", "c2"]
    with pytest.raises(ValueError, match="3 labelled volumes"):
        training_units(task, 4, 0, "unused", 1.0)


def test_plot_budget_curve_writes_a_png_for_one_k(tmp_path):
    rows = transfer.aggregate([{**_run(m, 0, d, d), "steps": s} for m, d, s in
                               [("scratch", 0.2, 4), ("m", 0.5, 4), ("scratch", 0.6, 16), ("m", 0.7, 16)]])
    assert plot_budget_curve(rows, tmp_path / "c.png").read_bytes()[:8] == PNG_SIGNATURE
    with pytest.raises(ValueError, match="one k"):
        plot_budget_curve([*rows, {**rows[0], "k": 2}], tmp_path / "d.png")


def test_plot_transfer_writes_a_png(tmp_path):
    rows = transfer.aggregate([_run("scratch", 0, 0.5, 0.5), _run("scratch", 1, 0.6, 0.6),
                               _run("m", 0, 0.7, 0.7), _run("m", 0, 0.8, 0.8, k=2)])
    path = plot_transfer(rows, tmp_path / "f.png", baseline="m")
    assert path.read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.usefixtures("one_thread")
def test_run_on_phantoms_writes_record_table_and_figure(tmp_path):
    out = tmp_path / "transfer.json"
    path, table = transfer.run("smoke", out, [
        "source=phantoms", "tasks=[phantom]", "methods=[swin_ssl]", "ks=[1]", "seeds=[0]",
        "pretrain_steps=1", "pretrain_batch=1", "finetune_steps=2", "curve_fractions=[0.5]",
    ])
    record = json.loads(path.read_text())
    rows = record["results"]
    assert [r["row"] for r in rows] == ["pretrain", *["run"] * 4, *["summary"] * 4]
    runs = [r for r in rows if r["row"] == "run"]
    # each arm's run tested at the curve's point (its network after one of two steps) and at its end
    assert [(r["method"], r["steps"], r["epochs"], r.get("snapshot_of")) for r in runs] == [
        ("scratch", 1, 1, 2), ("scratch", 2, 2, None), ("swin_ssl", 1, 1, 2), ("swin_ssl", 2, 2, None)]
    assert ["time_s" in r for r in runs] == [False, True, False, True]
    classes = [k for k in runs[0] if k.startswith("dice_")]
    assert len(classes) == 6  # the phantom's foreground structures
    for row in rows:
        for key, value in row.items():
            assert isinstance(value, str) or math.isfinite(value), (row["row"], key)
    for row in runs:
        assert {"task", "method", "k", "seed", "dice"} <= set(row) and 0.0 <= row["dice"] <= 1.0
    assert rows[0]["steps"] == 1 and rows[0]["export_target"] == "swinunetr"
    assert "diff" in rows[-1] and rows[-1]["method"] == "swin_ssl"
    assert out.with_suffix(".png").read_bytes()[:8] == PNG_SIGNATURE
    assert (tmp_path / "transfer-steps.png").read_bytes()[:8] == PNG_SIGNATURE
    assert record["config"]["figures"] == ["transfer.png", "transfer-steps.png"]
    runs_dir = tmp_path / "transfer-runs" / "finetune" / "phantom" / "k1" / "seed0" / "steps2"
    assert (runs_dir / "swin_ssl" / "eval" / "dice_per_class.json").is_file()
    assert (runs_dir / "swin_ssl" / "eval_epoch1" / "dice_per_class.json").is_file()
    # keep_models is off: neither the model nor its snapshots stay
    assert not (runs_dir / "swin_ssl" / "models" / "model.pt").exists()
    assert not list((runs_dir / "swin_ssl" / "models").rglob("*.pt"))
    assert "### phantom" in table and "Δ vs scratch" in table


@pytest.mark.usefixtures("one_thread")
def test_a_stopped_run_picks_up_where_it_stopped(tmp_path, monkeypatch):
    out = tmp_path / "transfer.json"
    overrides = ["source=phantoms", "tasks=[phantom]", "methods=[swin_ssl]", "ks=[1]", "seeds=[0]",
                 "pretrain_steps=1", "pretrain_batch=1", "finetune_steps=1", "curve_fractions=[]"]
    first = json.loads(transfer.run("smoke", out, overrides)[0].read_text())["results"]
    calls = []
    real = transfer.finetune_and_test
    monkeypatch.setattr(transfer, "pretrain", lambda *a, **k: calls.append("pretrain"))
    monkeypatch.setattr(transfer, "finetune_and_test", lambda *a, **k: calls.append("finetune") or real(*a, **k))
    # a second seed: only its two fine-tuning runs are new; the pretraining and seed 0 are read back
    again = json.loads(transfer.run("smoke", out, [*overrides, "seeds=[0,1]"])[0].read_text())["results"]
    assert calls == ["finetune", "finetune"]
    runs = [r for r in again if r["row"] == "run"]
    assert [(r["method"], r["seed"]) for r in runs] == [
        ("scratch", 0), ("swin_ssl", 0), ("scratch", 1), ("swin_ssl", 1)]
    assert runs[:2] == [r for r in first if r["row"] == "run"]
    assert [r for r in again if r["row"] == "pretrain"] == [r for r in first if r["row"] == "pretrain"]


@pytest.mark.usefixtures("one_thread")
def test_control_arm_fine_tunes_the_shared_start_and_pairs_every_method_with_it(tmp_path):
    out = tmp_path / "transfer.json"
    path, table = transfer.run("smoke", out, [
        "source=phantoms", "tasks=[phantom]", "methods=[swin_ssl]", "ks=[1]", "seeds=[0]", "pretrain_steps=2",
        "pretrain_batch=1", "finetune_steps=1", "curve_fractions=[]", "initial_encoders=true",
    ])
    rows = json.loads(path.read_text())["results"]
    pretrain = {r["method"]: r for r in rows if r["row"] == "pretrain"}
    assert (pretrain["init"]["bundle"], pretrain["init"]["steps"], pretrain["swin_ssl"]["steps"]) == ("swin_ssl", 0, 2)
    # two steps moved the encoder off the start the control arm fine-tunes
    assert 0.0 < pretrain["swin_ssl"]["encoder_change"] < 1.0 and "encoder_change" not in pretrain["init"]
    start = tmp_path / "transfer-runs" / "pretrain" / pretrain["init"]["pool"] / "init" / "models"
    assert read_encoder_info(start / "encoder_swinunetr.pt")["steps"] == 0
    runs = [r for r in rows if r["row"] == "run"]
    assert [(r["method"], r["reference"], r.get("control")) for r in runs] == [
        ("scratch", "scratch", None), ("init", "scratch", None), ("swin_ssl", "scratch", "init")]
    summary = {r["method"]: r for r in rows if r["row"] == "summary"}
    assert summary["swin_ssl"]["control_diff"] == pytest.approx(runs[2]["dice"] - runs[1]["dice"])
    assert "Δ vs initial encoder" in table
