"""The `medssl3d` command as a user runs it: a real subprocess on real files."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from medssl3d.data.phantoms import make_phantom
from medssl3d.engine.checkpoint import save_checkpoint
from medssl3d.networks.backbones import SwinBackbone


def medssl3d(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "medssl3d", *args], capture_output=True, encoding="utf-8", cwd=cwd, timeout=300
    )


def test_info_json_on_nifti_and_dicom(nifti_case, dicom_case):
    phantom = make_phantom(shape=(48, 48, 32), spacing=(1.5, 1.5, 2.0), seed=3)
    nifti = nifti_case("a", phantom)["image"]
    dicom = dicom_case("b", phantom)["image"]
    reports = []
    for path in (nifti, dicom):
        done = medssl3d("info", str(path), "--json")
        assert done.returncode == 0, done.stderr
        reports.append(json.loads(done.stdout))
    for report in reports:
        assert report["shape"] == [48, 48, 32]
        np.testing.assert_allclose(report["spacing"], [1.5, 1.5, 2.0], atol=1e-4)
    assert reports[1]["series_uid"]
    assert reports[0]["orientation"] == reports[1]["orientation"]


def test_info_plain_text_lists_every_field(nifti_case):
    done = medssl3d("info", str(nifti_case("a")["image"]))
    assert done.returncode == 0, done.stderr
    for field in ("shape", "spacing", "orientation", "direction", "intensity"):
        assert field in done.stdout


def test_bad_input_exits_2_with_one_line_naming_the_file(tmp_path):
    whole = tmp_path / "whole.nii"
    nib.save(nib.Nifti1Image(np.ones((16, 16, 16), np.float32), np.eye(4)), whole)
    truncated = tmp_path / "truncated.nii"
    truncated.write_bytes(whole.read_bytes()[:-4000])
    for path, problem in ((tmp_path / "missing.nii.gz", "not found"), (truncated, "truncated")):
        done = medssl3d("info", str(path))
        assert done.returncode == 2
        assert str(path) in done.stderr and problem in done.stderr
        assert "Traceback" not in done.stderr


def test_datalist_scans_a_mixed_tree(tmp_path, nifti_case, dicom_case):
    for i in range(3):
        nifti_case(f"n{i}")
    dicom_case("d0")
    out = tmp_path / "lists" / "dataset.json"
    done = medssl3d("datalist", str(tmp_path), "-o", str(out), "--val-fraction", "0.25")
    assert done.returncode == 0, done.stderr
    datalist = json.loads(out.read_text())
    entries = datalist["training"] + datalist["validation"]
    assert len(entries) == 4 and all("label" in e for e in entries)
    assert len(datalist["validation"]) == 1
    assert any(not e["image"].endswith(".nii.gz") for e in entries)  # the DICOM folder


def test_export_writes_swinunetr_weights(tmp_path):
    backbone = SwinBackbone(size="tiny")
    model = {f"student.backbone.{k}": v for k, v in backbone.state_dict().items()}
    ckpt = tmp_path / "last.pt"
    save_checkpoint({"method": "swin_ssl", "backbone": "swin-tiny", "model": model}, ckpt)
    out = tmp_path / "encoder.pt"
    done = medssl3d("export", str(ckpt), "-o", str(out), "--target", "swinunetr")
    assert done.returncode == 0, done.stderr
    weights = torch.load(out, weights_only=True)
    assert weights and all(k.startswith("swinViT.") for k in weights)


def test_export_hands_over_the_teacher_with_the_run_description(tmp_path):
    from medssl3d.data.presets import preset_for
    from medssl3d.transfer.encoder_info import encoder_run_info, read_encoder_info

    torch.manual_seed(0)
    student, teacher = SwinBackbone(size="tiny"), SwinBackbone(size="tiny")
    model = {**{f"student.backbone.{k}": v for k, v in student.state_dict().items()},
             **{f"teacher.backbone.{k}": v for k, v in teacher.state_dict().items()}}
    run_info = encoder_run_info(method="alice", export_target="swinunetr", backbone_size="tiny", roi_size=[64] * 3,
                                preset=preset_for("ct"))
    ckpt = save_checkpoint({"method": "alice", "backbone": "swin-tiny", "model": model, "step": 42,
                            "run_info": run_info}, tmp_path / "last.pt")
    out = tmp_path / "encoder.pt"
    done = medssl3d("export", str(ckpt), "-o", str(out))  # the teacher by default, as the bundles export
    assert done.returncode == 0, done.stderr
    assert "tensors of the teacher" in done.stdout
    saved = torch.load(out, weights_only=True)["state_dict"]
    key = "swinViT.patch_embed.proj.weight"
    torch.testing.assert_close(saved[key], teacher.state_dict()[f"net.{key}"])
    assert not torch.equal(saved[key], student.state_dict()[f"net.{key}"])
    info = read_encoder_info(out)
    assert (info["method"], info["steps"], info["source"], info["preset"]["modality"]) == ("alice", 42, "teacher", "ct")
    student_file = tmp_path / "student.pt"
    assert medssl3d("export", str(ckpt), "-o", str(student_file), "--source", "student").returncode == 0
    torch.testing.assert_close(torch.load(student_file, weights_only=True)["state_dict"][key],
                               student.state_dict()[f"net.{key}"])
    wrong = medssl3d("export", str(ckpt), "-o", str(tmp_path / "x.pt"), "--target", "unetr")
    assert wrong.returncode == 2 and "swinunetr" in wrong.stderr and "Traceback" not in wrong.stderr


@pytest.mark.parametrize("command", ["info", "datalist", "fetch-data", "export", "anomaly-map", "demo"])
def test_every_command_has_help(command):
    done = medssl3d(command, "--help")
    assert done.returncode == 0 and "usage" in done.stdout


def test_bench_takes_overrides_after_its_options(monkeypatch, tmp_path, capsys):
    import medssl3d.bench.step as step
    from medssl3d.cli import main

    seen = {}

    def fake_run(suite, output, overrides):
        seen.update(suite=suite, output=output, overrides=list(overrides))
        return tmp_path / "record.json", "| table |"

    monkeypatch.setattr(step, "run", fake_run)
    assert main(["bench", "step", "--suite", "smoke", "-o", "x.json", "repeats=1", "methods=[swin_ssl]"]) == 0
    assert seen == {"suite": "smoke", "output": "x.json", "overrides": ["repeats=1", "methods=[swin_ssl]"]}
    assert "| table |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["info", "x.nii.gz", "stray"])
