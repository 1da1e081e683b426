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


def test_samples_carry_only_fields_every_entry_has_so_batches_collate(nnunet_dataset, tmp_path):
    from monai.data import DataLoader

    root = nnunet_dataset(train=("a", "b"), test=())
    path = write_datalist(scan_folder(root, val_fraction=0.5, relative_to=tmp_path), tmp_path / "datalist.json")
    import json

    datalist = json.loads(path.read_text())
    datalist["training"][0]["slab"] = "inferior"  # a field only one entry has (the sample chest CT's slabs)
    for entry in [*datalist["training"], *datalist["validation"]]:
        entry["image"] = str((path.parent / entry["image"]).resolve())
    path.write_text(json.dumps(datalist))
    dataset = pretraining_dataset(path, preset_for("ct"), tmp_path / "cache", [])
    assert all(set(entry) == {"image", "subject"} for entry in dataset.data)
    batch = next(iter(DataLoader(dataset, batch_size=2)))
    assert batch["image"].shape[0] == 2 and sorted(batch["subject"]) == ["a", "b"]
