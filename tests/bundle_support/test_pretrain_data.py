import pytest

from medssl3d.bundle_support.pretrain_data import pretraining_dataset
from medssl3d.data.datalist import write_datalist
from medssl3d.data.folder_scan import scan_folder
from medssl3d.data.presets import preset_for


def test_nnunet_test_cases_never_enter_pretraining(nnunet_dataset, tmp_path):
    root = nnunet_dataset(train=("a", "b"), test=("t1", "t2"))
    path = write_datalist(scan_folder(root, val_fraction=0.5, relative_to=tmp_path), tmp_path / "datalist.json")
    dataset = pretraining_dataset(path, preset_for("ct"), tmp_path / "cache", [])
    assert sorted(entry["subject"] for entry in dataset.data) == ["a", "b"]
    assert not any("imagesTs" in entry["image"] for entry in dataset.data)
    with pytest.raises(ValueError, match="'test' split holds held-out cases"):
        pretraining_dataset(path, preset_for("ct"), tmp_path / "cache", [], splits=("training", "test"))
