"""Serving without a server: the weights check, the app layout, the loopback rule and the environment recipe."""

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

from medssl3d.bundle_support.labels import channel_def
from medssl3d.bundle_support.settings import bake_settings
from medssl3d.bundle_support.weights import check_bundle_weights
from medssl3d.data.errors import InputError
from medssl3d.data.presets import preset_for
from medssl3d.serving import environment
from medssl3d.serving.app import SAMPLE_APP, prepare_app
from medssl3d.serving.export_bundle import inference_config, network_config, preprocessing_transforms
from medssl3d.serving.server import LOOPBACK, LabelServer, check_host

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "segmentation"
SMALL = {"arch": "unetr", "roi_size": [32, 32, 32], "feature_size": 8, "vit_hidden_size": 96, "vit_mlp_dim": 192,
         "vit_num_heads": 4}


def _network(bundle: Path, **settings):
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.update({"bundle_root": str(bundle), **settings})
    return parser.get_parsed_content("network_def")


@pytest.fixture
def bundle(tmp_path) -> Path:
    target = tmp_path / "seg"
    shutil.copytree(BUNDLE, target, ignore=shutil.ignore_patterns("smoke", "models", "eval", "runs"))
    bake_settings(target, SMALL)
    (target / "models").mkdir()
    return target


@pytest.fixture
def fake_env(tmp_path) -> Path:
    """An environment folder with just the monaibundle sample app (prepare_app copies nothing else)."""
    app = tmp_path / "env" / SAMPLE_APP
    app.mkdir(parents=True)
    (app / "main.py").write_text("# MONAI Label's app\n")
    return tmp_path / "env"


def test_matching_weights_pass_with_full_count(bundle):
    torch.save(_network(bundle).state_dict(), bundle / "models" / "model.pt")
    report = check_bundle_weights(bundle)
    assert report.ok and report.matched == report.total > 0


def test_weights_of_another_size_are_refused_with_counts(bundle):
    torch.save(_network(bundle, feature_size=16, vit_hidden_size=192, vit_num_heads=6).state_dict(),
               bundle / "models" / "model.pt")
    total = len(_network(bundle).state_dict())
    with pytest.raises(InputError, match=r"model\.pt.*matched \d+/" + str(total)) as err:
        check_bundle_weights(bundle)
    assert "with another shape" in str(err.value)


def test_ddp_prefixed_weights_are_refused(bundle):
    state = {f"module.{k}": v for k, v in _network(bundle).state_dict().items()}
    torch.save(state, bundle / "models" / "model.pt")
    with pytest.raises(InputError, match=r"matched 0/\d+ tensors.*unexpected"):
        check_bundle_weights(bundle)


def test_missing_model_is_refused(bundle):
    with pytest.raises(InputError, match="model.pt: missing"):
        check_bundle_weights(bundle)


def test_prepare_app_refuses_mismatch_before_writing(bundle, fake_env, tmp_path):
    torch.save({"weight": torch.zeros(3)}, bundle / "models" / "model.pt")
    with pytest.raises(InputError, match="matched 0/"):
        prepare_app(bundle, tmp_path / "app", fake_env)
    assert not (tmp_path / "app").exists()


def test_prepare_app_layout(bundle, fake_env, tmp_path):
    torch.save({"model": _network(bundle).state_dict()}, bundle / "models" / "model.pt")
    (bundle / "smoke").mkdir()
    for run_state in ("checkpoint.pt", "checkpoint_epoch=3.pt"):  # the training run's, not the served model's
        (bundle / "models" / run_state).write_bytes(b"state")
    app = prepare_app(bundle, tmp_path / "app", fake_env, model_name="seg_model")
    assert sorted(p.name for p in (app.bundle_dir / "models").iterdir()) == ["model.pt"]
    assert (app.app_dir / "main.py").is_file()
    assert (app.bundle_dir / "models" / "model.pt").is_file()
    assert app.bundle_dir == app.app_dir / "model" / "seg_model"
    assert not (app.bundle_dir / "smoke").exists()
    assert (app.python_path / "medssl3d" / "serving" / "app.py").is_file()


@pytest.fixture
def monai_only_bundle(tmp_path) -> Path:
    """A bundle written as ``medssl3d export-bundle`` writes its configs (MONAI components only), random weights."""
    target = tmp_path / "portable"
    (target / "configs").mkdir(parents=True)
    network = network_config(SMALL, num_classes=7)
    inference = inference_config(preprocessing_transforms(preset_for("ct")), network, roi_size=SMALL["roi_size"],
                                 sw_batch_size=1, sw_overlap=0.5)
    (target / "configs" / "inference.json").write_text(json.dumps(inference))
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    meta["required_packages_version"] = {"nibabel": "5.4.2", "einops": "0.8.2"}
    (target / "configs" / "metadata.json").write_text(json.dumps(meta))
    (target / "models").mkdir()
    torch.save(ConfigParser({"net": network}).get_parsed_content("net").state_dict(), target / "models" / "model.pt")
    return target


def test_monai_only_bundle_is_served_without_medssl3d(bundle, monai_only_bundle, fake_env, tmp_path):
    torch.save(_network(bundle).state_dict(), bundle / "models" / "model.pt")
    first = prepare_app(bundle, tmp_path / "app", fake_env)
    assert first.python_path is not None and (first.python_path / "medssl3d").is_dir()
    app = prepare_app(monai_only_bundle, tmp_path / "app", fake_env)  # the same app folder, now MONAI-only
    assert app.python_path is None and not (tmp_path / "app" / "python" / "medssl3d").exists()
    assert app.weights.ok
    path = LabelServer(app, tmp_path / "studies", fake_env).environment()["PYTHONPATH"].split(os.pathsep)
    assert str(tmp_path / "app" / "python") not in path


def test_server_binds_loopback_unless_asked(bundle, fake_env, tmp_path):
    torch.save(_network(bundle).state_dict(), bundle / "models" / "model.pt")
    app = prepare_app(bundle, tmp_path / "app", fake_env)
    command = LabelServer(app, tmp_path / "studies", fake_env).command()
    assert command[command.index("--host") + 1] == LOOPBACK
    conf = {command[i + 1]: command[i + 2] for i, c in enumerate(command) if c == "--conf"}
    assert conf["models"] == "seg" and conf["sam2"] == "false" and conf["zoo_source"] == "github"
    with pytest.raises(ValueError, match="0.0.0.0"):
        LabelServer(app, tmp_path / "studies", fake_env, host="0.0.0.0")
    check_host("0.0.0.0", allow_remote=True)


def test_cli_refuses_remote_host_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "medssl3d", "label-server", str(tmp_path), "--host", "0.0.0.0"],
        capture_output=True, encoding="utf-8", check=False,
    )
    assert result.returncode == 2
    assert "--allow-remote" in result.stderr and "Traceback" not in result.stderr


PIP_CONFIG_LIST = """\
global.index-url='https://mirror.hospital.example/simple'
global.find-links='/opt/wheels /srv/wheels'
global.trusted-host='mirror.hospital.example'
install.extra-index-url='https://pypi.org/simple\\nfile:///opt/pypi/simple'
download.index-url='https://elsewhere.example/simple'
:env:.cert='/etc/ssl/certs/hospital.pem'
"""


def test_environment_install_keeps_the_users_index_and_drops_only_cpu_torch_links():
    settings = environment.parse_pip_config(PIP_CONFIG_LIST)
    assert settings["index-url"] == "https://mirror.hospital.example/simple"  # not the download section's
    environ = {"HOME": "/root", "PIP_FIND_LINKS": "/opt/wheels", "PIP_CONFIG_FILE": "/etc/pip.conf"}
    env = environment.install_environment(environ, settings, drop_link=lambda link: link == "/opt/wheels")
    assert env["HOME"] == "/root"
    assert env["PIP_INDEX_URL"] == "https://mirror.hospital.example/simple"
    assert env["PIP_EXTRA_INDEX_URL"].split() == ["https://pypi.org/simple", "file:///opt/pypi/simple"]
    assert env["PIP_TRUSTED_HOST"] == "mirror.hospital.example"
    assert env["PIP_CERT"] == "/etc/ssl/certs/hospital.pem"
    assert env["PIP_FIND_LINKS"] == "/srv/wheels"
    assert env["PIP_CONFIG_FILE"] == os.devnull  # the files' settings are all in the variables now
    only_torch = environment.install_environment(environ, {"find-links": "/opt/wheels"}, lambda link: True)
    assert "PIP_FIND_LINKS" not in only_torch


def test_only_local_cpu_torch_links_are_dropped(tmp_path):
    cpu, cuda = tmp_path / "cpu", tmp_path / "cuda"
    for folder, wheel in ((cpu, "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"),
                          (cuda, "torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl")):
        folder.mkdir()
        (folder / wheel).touch()
    assert environment.holds_local_cpu_torch(str(cpu)) and environment.holds_local_cpu_torch(cpu.as_uri())
    assert environment.holds_local_cpu_torch(str(next(cpu.iterdir())))
    assert not environment.holds_local_cpu_torch(str(cuda))
    assert not environment.holds_local_cpu_torch("https://download.pytorch.org/whl/cpu/torch/")


def test_environment_marker_and_location(monkeypatch, tmp_path):
    assert not environment.is_ready(tmp_path)
    monkeypatch.setenv(environment.ENV_VAR, str(tmp_path / "venv"))
    assert environment.default_venv() == tmp_path / "venv"


def test_bake_settings_writes_every_defining_config_and_refuses_unknown_ids(bundle):
    written = bake_settings(bundle, {"feature_size": 24, "train#trainer#max_epochs": 3})
    assert set(written) == {"train.json", "inference.json"}
    train = json.loads((bundle / "configs" / "train.json").read_text())
    assert train["feature_size"] == 24 and train["train"]["trainer"]["max_epochs"] == 3
    with pytest.raises(ValueError, match="feature_sise"):
        bake_settings(bundle, {"feature_sise": 24})


def test_channel_def_names_the_bad_file(tmp_path):
    meta = tmp_path / "metadata.json"
    meta.write_text(json.dumps({"network_data_format": {"outputs": {}}}))
    with pytest.raises(InputError, match="metadata.json.*channel_def"):
        channel_def(meta)
    assert channel_def(BUNDLE / "configs" / "metadata.json")["0"] == "background"
