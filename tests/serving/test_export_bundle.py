"""``medssl3d export-bundle``: a fine-tuning run as a bundle of MONAI components only.

The preset's MONAI transforms are checked voxel for voxel against medssl3d's own preset, and the exported
``inference.json`` runs with ``python -m monai.bundle run`` in a virtual environment holding only torch, monai
(with its ``fire`` extra, for that command line) and the packages the bundle's metadata requires, nibabel and
einops (no ignite, no medssl3d; built once, cached in ``$MEDSSL3D_TEST_VENV`` or
``~/.cache/medssl3d/test-venvs/monai-only``), where its prediction must match medssl3d's own ``inference.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from monai.apps.utils import HashCheckError
from monai.bundle import ConfigParser, download_large_files, verify_metadata
from monai.transforms import Compose

from medssl3d.bundle_support.networks import build_segmentation_network
from medssl3d.bundle_support.verify import META_SCHEMA
from medssl3d.bundle_support.weights import compare_weights
from medssl3d.cli import main
from medssl3d.data.errors import InputError
from medssl3d.data.phantoms import make_phantom, write_nifti
from medssl3d.data.presets import build_preset, preset_for
from medssl3d.jobs.bundles import bundle_dir
from medssl3d.jobs.finetune import read_run_record
from medssl3d.jobs.predict import run_predict
from medssl3d.serving.environment import ensure_venv, venv_python
from medssl3d.serving.export_bundle import (
    LARGE_FILES,
    MODEL_FILE,
    export_bundle,
    medssl3d_references,
    network_config,
    preprocessing_transforms,
)

VENV_VAR = "MEDSSL3D_TEST_VENV"
#: torch, monai and what the exported metadata requires (nibabel, and einops for MONAI's transformer blocks);
#: monai's ``fire`` extra is what ``python -m monai.bundle`` parses its command line with.
MONAI_ONLY = (("torch==2.13.0", "monai[fire]==1.6.1", "nibabel", "einops"),)
MONAI_ONLY_CHECK = "import monai, nibabel, torch; print(monai.__version__, torch.__version__)"
#: SwinUNETR at its smallest (feature size 12; 64^3 windows, as its 1/32 bottleneck needs) on 3 mm phantoms.
SWIN_RUN = ("arch=swinunetr", "feature_size=12", "roi_size=[64,64,64]", "spacing_mm=3.0")
MIN_AGREEMENT = 0.99


def _one_thread_env() -> dict[str, str]:
    """This environment without PYTHONPATH (nothing of medssl3d may leak in), one thread per process."""
    return {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize(("modality", "spacing"), [("ct", None), ("ct", 2.0), ("mri", None)])
def test_monai_transforms_reproduce_the_preset(tmp_path, modality, spacing):
    preset = preset_for(modality, spacing)
    phantom = make_phantom(shape=(48, 40, 32), spacing=(1.2, 1.5, 2.0), modality=modality, seed=3,
                           rotation_deg=(0.0, 0.0, 15.0))
    image = write_nifti(phantom.image, phantom.affine, tmp_path / "case.nii.gz")
    parser = ConfigParser({"transforms": preprocessing_transforms(preset)})
    ours = build_preset(preset, keys=["image"])({"image": image})["image"]
    monai_only = Compose(parser.get_parsed_content("transforms"))({"image": image})["image"]
    assert monai_only.shape == ours.shape and monai_only.dtype == ours.dtype == torch.float32
    torch.testing.assert_close(monai_only.affine, ours.affine)
    torch.testing.assert_close(monai_only.as_tensor(), ours.as_tensor(), rtol=0, atol=1e-6)
    assert [op["class"] for op in monai_only.applied_operations] == [op["class"] for op in ours.applied_operations]


def test_presets_monai_cannot_express_are_refused():
    with pytest.raises(ValueError, match="N4"):
        preprocessing_transforms(dataclasses.replace(preset_for("mri"), n4_bias_correction=True))
    with pytest.raises(ValueError, match="4D"):
        preprocessing_transforms(dataclasses.replace(preset_for("ct"), allow_4d_index=0))


@pytest.mark.parametrize("arch", ["swinunetr", "unetr"])
def test_network_config_is_the_network_medssl3d_builds(arch):
    settings = {"arch": arch, "feature_size": 12, "roi_size": [32, 32, 32], "vit_hidden_size": 96,
                "vit_mlp_dim": 192, "vit_num_heads": 4}
    config = network_config(settings, num_classes=3)
    assert config["_target_"].startswith("monai.networks.nets.")
    ours = build_segmentation_network(arch, in_channels=1, out_channels=3, feature_size=12, img_size=[32, 32, 32],
                                      vit_hidden_size=96, vit_mlp_dim=192, vit_num_heads=4)
    report = compare_weights(ConfigParser({"net": config}).get_parsed_content("net"), ours.state_dict())
    assert report.ok and report.matched == len(ours.state_dict())


def test_segmentation_bundle_needs_medssl3d():
    references = medssl3d_references(bundle_dir("segmentation"))
    assert any(r.startswith("inference.json: $import medssl3d") for r in references), references
    assert any(r.startswith("metadata.json: required package medssl3d") for r in references), references


@pytest.fixture(scope="module")
def monai_only_python(skip_unless_pypi) -> Path:
    """The interpreter of a cached venv holding torch, monai 1.6.1 and nibabel only (pip's own configuration)."""
    root = Path(os.environ.get(VENV_VAR) or Path.home() / ".cache" / "medssl3d" / "test-venvs" / "monai-only")
    try:
        ensure_venv(root, MONAI_ONLY, check=MONAI_ONLY_CHECK)
    except RuntimeError:
        skip_unless_pypi("the torch + monai + nibabel test environment is not built")
        raise
    return venv_python(root)


@pytest.fixture(scope="module")
def swin_run(finetune_run) -> Path:
    return finetune_run("swin", *SWIN_RUN)


@pytest.fixture(scope="module")
def exported(swin_run, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("export") / "phantom_swin"
    assert main(["export-bundle", str(swin_run), "-o", str(target)]) == 0
    return target


@pytest.mark.slow
def test_exported_bundle_is_monai_only_and_describes_the_run(exported, swin_run):
    for name in ("configs/inference.json", "configs/metadata.json", "configs/logging.conf", "docs/README.md",
                 "LICENSE", LARGE_FILES, str(MODEL_FILE)):
        assert (exported / name).is_file(), name
    assert medssl3d_references(exported) == []
    text = "\n".join((exported / "configs" / n).read_text() for n in ("inference.json", "logging.conf"))
    assert "medssl3d" not in text
    verify_metadata(meta_file=str(exported / "configs" / "metadata.json"), filepath=str(META_SCHEMA))
    meta = json.loads((exported / "configs" / "metadata.json").read_text())
    settings = read_run_record(swin_run)["settings"]
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert pred["channel_def"] == settings["label_names"] and pred["num_channels"] == len(settings["label_names"])
    assert meta["network_data_format"]["inputs"]["image"]["modality"] == "CT"
    assert meta["preprocessing"]["spacing_mm"] == [3.0, 3.0, 3.0]
    assert meta["preprocessing"]["intensity"]["window"] == [-125.0, 225.0]
    assert set(meta["required_packages_version"]) == {"nibabel", "einops"}
    network = json.loads((exported / "configs" / "inference.json").read_text())["network_def"]
    assert network == {"_target_": "monai.networks.nets.SwinUNETR", "in_channels": 1, "out_channels": 7,
                       "feature_size": 12, "spatial_dims": 3, "use_checkpoint": False}
    (entry,) = yaml.safe_load((exported / LARGE_FILES).read_text())["large_files"]
    assert entry["path"] == "models/model.pt" and entry["hash_type"] == "sha256"
    assert entry["url"] == (swin_run / "models" / "model.pt").as_uri()
    assert (exported / MODEL_FILE).read_bytes() == (swin_run / "models" / "model.pt").read_bytes()


@pytest.mark.slow
def test_large_files_restores_the_model_as_the_zoo_does(exported, swin_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    (copy / MODEL_FILE).unlink()
    download_large_files(bundle_path=str(copy))  # `python -m monai.bundle download_large_files`: url + hash
    assert (copy / MODEL_FILE).read_bytes() == (swin_run / "models" / "model.pt").read_bytes()
    (copy / MODEL_FILE).write_bytes(b"not the weights")
    with pytest.raises(HashCheckError, match="sha256 hash check"):
        download_large_files(bundle_path=str(copy))


@pytest.mark.slow
def test_export_refuses_a_used_folder_and_a_folder_that_is_no_run(exported, swin_run, tmp_path):
    with pytest.raises(InputError, match="not empty"):
        export_bundle(swin_run, exported)
    with pytest.raises(InputError, match="run.json"):
        export_bundle(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_monai_only_environment_predicts_as_medssl3d(exported, swin_run, monai_only_python, tmp_path):
    env = _one_thread_env()
    for absent in ("medssl3d", "ignite"):
        tried = subprocess.run([str(monai_only_python), "-c", f"import {absent}"], cwd=exported, env=env,
                               capture_output=True, encoding="utf-8", check=False)
        assert tried.returncode != 0 and f"No module named '{absent}'" in tried.stderr
    phantom = make_phantom(modality="ct", seed=10, rotation_deg=(0.0, 0.0, 10.0))
    image = write_nifti(phantom.image, phantom.affine, tmp_path / "in" / "subject010.nii.gz")

    done = subprocess.run(
        [str(monai_only_python), "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
         "--bundle_root", str(exported), "--datalist", f"['{image}']", "--output_dir", str(tmp_path / "monai")],
        cwd=exported, env=env, capture_output=True, encoding="utf-8", check=False, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert run_predict(swin_run, [image], tmp_path / "medssl3d") == 0

    theirs = nib.load(tmp_path / "monai" / "subject010_pred.nii.gz")
    ours = nib.load(tmp_path / "medssl3d" / "subject010_pred.nii.gz")
    source = nib.load(image)
    assert theirs.shape == ours.shape == source.shape
    np.testing.assert_allclose(theirs.affine, ours.affine, atol=1e-5)
    np.testing.assert_allclose(theirs.affine, source.affine, atol=1e-5)
    assert len(np.unique(np.asarray(ours.dataobj))) > 1  # a segmentation, not one class everywhere
    agreement = float((np.asarray(theirs.dataobj) == np.asarray(ours.dataobj)).mean())
    assert agreement >= MIN_AGREEMENT, agreement

