"""A real MONAI Label 0.8.5 server on 127.0.0.1 serving the segmentation bundle fine-tuned on a phantom, and
one serving a run exported by ``medssl3d export-bundle`` (MONAI components only) without medssl3d's code.

The MONAI Label environment is built on first use (about 7.5 GB from PyPI, a few minutes) and cached in
``$MEDSSL3D_LABEL_VENV`` or ``~/.cache/medssl3d/monailabel-0.8.5``; the server is stopped by its process
group when the module ends.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil
import pytest
from monai.bundle import ConfigWorkflow

from medssl3d.bundle_support.settings import bake_settings
from medssl3d.bundle_support.smoke_data import write_smoke_datalist
from medssl3d.bundle_support.weights import check_bundle_weights
from medssl3d.data.phantoms import make_phantom, write_nifti
from medssl3d.serving.app import BUNDLE_IGNORE, prepare_app
from medssl3d.serving.client import LabelClient
from medssl3d.serving.environment import ensure_environment, venv_python
from medssl3d.serving.export_bundle import export_bundle
from medssl3d.serving.server import LOOPBACK, LabelServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400), pytest.mark.usefixtures("one_thread")]

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "segmentation"
MODEL = "phantom_segmentation"
# UNETR on the phantom at 3 mm (32^3): the settings a user's fine-tune run would bake into its bundle.
SETTINGS = {
    "arch": "unetr", "roi_size": [32, 32, 32], "feature_size": 16, "vit_hidden_size": 192, "vit_mlp_dim": 384,
    "vit_num_heads": 6, "spacing_mm": 3.0, "num_samples": 2, "num_workers": 0, "learning_rate": 0.002,
    "sw_batch_size": 1,
}
FINETUNE_EPOCHS = 40
STUDY_SEEDS = (10, 11)
LEARNT_CLASSES = ("body", "fat", "spine")
MIN_DICE = 0.7
PORTABLE_MODEL = "phantom_portable"
#: The same UNETR, fine-tuned by `medssl3d finetune` for one epoch (the served mask's shape is what is checked).
PORTABLE_RUN = tuple(f"{k}={json.dumps(SETTINGS[k])}" for k in (
    "arch", "roi_size", "feature_size", "vit_hidden_size", "vit_mlp_dim", "vit_num_heads", "spacing_mm"))
PYPI_PROBE = "https://pypi.org/simple/monailabel/"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1))


@pytest.fixture(scope="module")
def env_root():
    try:
        return ensure_environment()
    except RuntimeError:
        try:
            urllib.request.urlopen(PYPI_PROBE, timeout=30).close()
        except OSError as e:
            pytest.skip(f"the MONAI Label environment is not built and PyPI cannot be reached: {e}")
        raise


@pytest.fixture(scope="module")
def finetuned_bundle(tmp_path_factory) -> Path:
    """The segmentation bundle fine-tuned on one phantom through its own train.json, settings baked in."""
    root = tmp_path_factory.mktemp("label")
    bundle = root / MODEL
    shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("models", *BUNDLE_IGNORE))
    bake_settings(bundle, SETTINGS)
    datalist_path = Path(write_smoke_datalist(root / "train_data", n_train=1, n_val=0))
    datalist = json.loads(datalist_path.read_text())
    datalist["validation"] = datalist["training"]
    datalist_path.write_text(json.dumps(datalist))
    workflow = ConfigWorkflow(
        config_file=str(bundle / "configs" / "train.json"), meta_file=str(bundle / "configs" / "metadata.json"),
        logging_file=False, workflow_type="train", bundle_root=str(bundle), datalist=str(datalist_path),
        val_interval=FINETUNE_EPOCHS, **{"train#trainer#max_epochs": FINETUNE_EPOCHS},
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    assert (bundle / "models" / "model.pt").is_file()
    return bundle


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> dict[str, dict]:
    """Two unseen phantom subjects as NIfTI studies, with their reference labels kept aside."""
    root = tmp_path_factory.mktemp("studies")
    refs = tmp_path_factory.mktemp("references")
    cases = {}
    for seed in STUDY_SEEDS:
        phantom = make_phantom(modality="ct", seed=seed)
        name = f"subject{seed:03d}"
        cases[name] = {
            "image": write_nifti(phantom.image, phantom.affine, root / f"{name}.nii.gz"),
            "label": write_nifti(phantom.label, phantom.affine, refs / f"{name}_seg.nii.gz"),
            "names": phantom.label_names,
        }
    return cases


@pytest.fixture(scope="module")
def server(env_root, finetuned_bundle, studies, tmp_path_factory):
    app = prepare_app(finetuned_bundle, tmp_path_factory.mktemp("app"), env_root, model_name=MODEL)
    studies_dir = Path(next(iter(studies.values()))["image"]).parent
    with LabelServer(app, studies_dir, env_root, port=_free_port()) as running:
        yield running
    assert running.process.poll() is not None


def test_info_lists_the_model_with_the_bundle_labels(server):
    info = LabelClient(server.url).info()
    channel_def = json.loads((server.app.bundle_dir / "configs" / "metadata.json").read_text())[
        "network_data_format"]["outputs"]["pred"]["channel_def"]
    expected = {name.lower(): int(k) for k, name in channel_def.items() if name != "background"}
    assert info["models"][MODEL]["labels"] == expected
    assert MODEL in info["trainers"]


def test_server_listens_on_loopback_only(server):
    processes = [psutil.Process(server.process.pid), *psutil.Process(server.process.pid).children(recursive=True)]
    listening = [c.laddr for p in processes for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert listening, "the server process has no listening socket"
    assert {addr.ip for addr in listening} == {LOOPBACK}, listening


def test_infer_returns_mask_on_the_input_grid(server, studies, tmp_path):
    name, case = next(iter(studies.items()))
    result = LabelClient(server.url).infer(MODEL, name, tmp_path / "pred.nii.gz")
    pred, image = nib.load(result), nib.load(case["image"])
    assert pred.shape == image.shape
    np.testing.assert_allclose(pred.affine, image.affine, atol=1e-3)
    mask = np.asarray(pred.dataobj).astype(int)
    reference = np.asarray(nib.load(case["label"]).dataobj).astype(int)
    assert set(np.unique(mask)) <= set(case["names"])
    by_name = {v: k for k, v in case["names"].items()}
    dice = {c: _dice(mask == by_name[c], reference == by_name[c]) for c in LEARNT_CLASSES}
    assert min(dice.values()) > MIN_DICE, dice


def test_uploaded_labels_and_one_epoch_train_rewrite_model(server, studies):
    client = LabelClient(server.url)
    for name, case in studies.items():
        assert client.save_label(name, case["label"])["label"] == name
    labelled = [k for k, v in client.datastore()["objects"].items() if v.get("labels", {}).get("final")]
    assert sorted(labelled) == sorted(studies)
    model_file = server.app.bundle_dir / "models" / "model.pt"
    before = _digest(model_file)
    client.train(MODEL, max_epochs=1, val_split=0.5, device="cpu", multi_gpu=False)
    assert _digest(model_file) != before
    assert check_bundle_weights(server.app.bundle_dir).ok


@pytest.fixture(scope="module")
def exported_bundle(finetune_run, tmp_path_factory) -> Path:
    """A run of ``medssl3d finetune`` on a phantom, exported as a bundle of MONAI components only."""
    target = tmp_path_factory.mktemp("portable") / PORTABLE_MODEL
    export_bundle(finetune_run("label_portable", *PORTABLE_RUN), target)
    return target


def test_monai_only_bundle_is_served_without_medssl3d(env_root, exported_bundle, studies, tmp_path_factory, tmp_path):
    name, case = next(iter(studies.items()))
    studies_dir = tmp_path_factory.mktemp("portable_studies")  # a datastore of its own beside the other server's
    shutil.copy2(case["image"], studies_dir / Path(case["image"]).name)
    app = prepare_app(exported_bundle, tmp_path_factory.mktemp("portable_app"), env_root, model_name=PORTABLE_MODEL)
    assert app.python_path is None and not (app.app_dir / "python" / "medssl3d").exists()
    serving = LabelServer(app, studies_dir, env_root, port=_free_port())
    tried = subprocess.run([str(venv_python(env_root)), "-c", "import medssl3d"], env=serving.environment(),
                           cwd=app.app_dir, capture_output=True, encoding="utf-8", check=False)
    assert tried.returncode != 0 and "No module named 'medssl3d'" in tried.stderr
    with serving:
        client = LabelClient(serving.url)
        names = json.loads((exported_bundle / "configs" / "metadata.json").read_text())[
            "network_data_format"]["outputs"]["pred"]["channel_def"]
        expected = {label.lower(): int(k) for k, label in names.items() if label != "background"}
        assert client.info()["models"][PORTABLE_MODEL]["labels"] == expected
        result = client.infer(PORTABLE_MODEL, name, tmp_path / "pred.nii.gz")
    assert serving.process.poll() is not None
    pred, image = nib.load(result), nib.load(case["image"])
    assert pred.shape == image.shape
    np.testing.assert_allclose(pred.affine, image.affine, atol=1e-3)
    assert set(np.unique(np.asarray(pred.dataobj)).astype(int)) <= {int(k) for k in names}
