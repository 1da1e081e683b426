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
from medssl3d.serving import environment
from medssl3d.serving.app import SAMPLE_APP, prepare_app
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
    app = prepare_app(bundle, tmp_path / "app", fake_env, model_name="seg_model")
    assert (app.app_dir / "main.py").is_file()
    assert (app.bundle_dir / "models" / "model.pt").is_file()
    assert app.bundle_dir == app.app_dir / "model" / "seg_model"
    assert not (app.bundle_dir / "smoke").exists()
    assert (app.python_path / "medssl3d" / "serving" / "app.py").is_file()


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
        [sys.executable, "-m", "medssl3d.cli", "label-server", str(tmp_path), "--host", "0.0.0.0"],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 2
    assert "--allow-remote" in result.stderr and "Traceback" not in result.stderr


def test_environment_install_ignores_local_wheel_steering(monkeypatch, tmp_path):
    monkeypatch.setenv("PIP_FIND_LINKS", "/opt/wheels")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "file:///opt/pypi/simple")
    env = environment._pip_env()
    assert "PIP_FIND_LINKS" not in env and "PIP_EXTRA_INDEX_URL" not in env
    assert env["PIP_CONFIG_FILE"] == os.devnull
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
