"""The segmentation bundle takes its classes from the datalist and checks every label map before training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import ConfigParser, ConfigWorkflow

from medssl3d.data.datalist import write_datalist
from medssl3d.data.errors import DatalistError
from medssl3d.data.folder_scan import scan_folder

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "segmentation"
CONFIGS = BUNDLE / "configs"
META = CONFIGS / "metadata.json"
SMALL_NETWORK = {"feature_size": 12}


def parsed(configs, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f"{c}.json") for c in configs])
    parser.update({"bundle_root": str(BUNDLE), "metadata_file": str(META), **SMALL_NETWORK, **overrides})
    return parser


@pytest.fixture
def two_class_datalist(nnunet_dataset, tmp_path) -> Path:
    """``medssl3d datalist`` of a 2-class nnU-Net dataset (background, liver), written beside it."""
    root = nnunet_dataset()
    return write_datalist(scan_folder(root, val_fraction=0.34, relative_to=tmp_path), tmp_path / "datalist.json")


def test_two_class_dataset_builds_a_two_class_network(two_class_datalist):
    for configs in (["train"], ["train", "evaluate"]):
        parser = parsed(configs, datalist=str(two_class_datalist))
        assert parser.get_parsed_content("label_names") == {"0": "background", "1": "liver"}
        net = parser.get_parsed_content("network_def")
        assert net.out.conv.conv.out_channels == 2


def test_inference_reads_the_classes_of_the_bundles_datalist(two_class_datalist, tmp_path):
    bundle = tmp_path / "bundle"
    (bundle / "data").mkdir(parents=True)
    shutil.copy(two_class_datalist, bundle / "data" / "dataset.json")
    train = parsed(["train"], bundle_root=str(bundle))
    inference = parsed(["inference"], bundle_root=str(bundle))
    assert train.get_parsed_content("label_names") == inference.get_parsed_content("label_names")
    assert inference.get_parsed_content("num_classes") == 2


def test_label_values_outside_the_classes_stop_training_with_one_error(two_class_datalist, tmp_path):
    datalist = json.loads(two_class_datalist.read_text())
    bad = [datalist["training"][0]["label"], datalist["validation"][0]["label"]]
    for label in bad:
        img = nib.load(str(tmp_path / label))
        data = np.asarray(img.dataobj).copy()
        data[0, 0, 0] = 5
        nib.save(nib.Nifti1Image(data, img.affine), str(tmp_path / label))
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "train.json"), meta_file=str(META), logging_file=False, workflow_type="train",
        bundle_root=str(BUNDLE), metadata_file=str(META), datalist=str(two_class_datalist),
        ckpt_dir=str(tmp_path / "models"), output_dir=str(tmp_path / "eval"), num_workers=0, **SMALL_NETWORK,
    )
    workflow.initialize()
    with pytest.raises(RuntimeError) as failure:  # MONAI wraps what a config expression raises
        workflow.run()
    error = failure.value.__cause__
    assert isinstance(error, DatalistError) and len(error.problems) == 2
    for label, problem in zip(sorted(bad), sorted(error.problems), strict=True):
        assert label in problem and "value(s) 5 are not among the 2 classes" in problem
    assert not (tmp_path / "models").exists()
