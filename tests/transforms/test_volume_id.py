import pytest
import torch
from monai.data import MetaTensor, list_data_collate

from medssl3d.transforms.volume_id import VolumeIdd, volume_id


def _loaded(name):
    return MetaTensor(torch.zeros(1, 2, 2, 2), meta={"filename_or_obj": name})


def test_id_is_a_stable_non_negative_hash_of_the_name():
    # fixed values: the same in every process and run (Python's own hash() is salted per process)
    assert volume_id("/data/ct/case_001.nii.gz") == 6278445027331197583
    assert volume_id("patient-7") == 4091118323247778014
    assert volume_id("a") != volume_id("b") and 0 <= volume_id("a") < 2**63


def test_id_from_the_source_file_name_and_the_source_is_kept():
    t = VolumeIdd("image", "volume_id")
    image = _loaded("/data/ct/case_001.nii.gz")
    out = t({"image": image})
    assert out["image"] is image and out["volume_id"].dtype == torch.long
    assert int(out["volume_id"]) == 6278445027331197583
    other = t({"image": _loaded("/data/ct/case_002.nii.gz")})
    assert int(other["volume_id"]) != int(out["volume_id"])
    assert list_data_collate([out, other])["volume_id"].shape == (2,)


def test_a_given_id_wins_names_are_hashed_integers_kept():
    t = VolumeIdd()
    assert int(t({"image": _loaded("x.nii.gz"), "volume_id": 12})["volume_id"]) == 12
    assert int(t({"image": _loaded("x.nii.gz"), "volume_id": "patient-7"})["volume_id"]) == 4091118323247778014
    assert int(t({"image": torch.zeros(1, 2, 2, 2), "volume_id": torch.tensor(3)})["volume_id"]) == 3


def test_no_id_and_bad_ids_raise():
    with pytest.raises(ValueError, match="no volume id.*'volume_id'.*'image'"):
        VolumeIdd()({"image": torch.zeros(1, 2, 2, 2)})
    with pytest.raises(ValueError, match="'volume_id' must be a non-negative"):
        VolumeIdd()({"image": _loaded("x.nii.gz"), "volume_id": -2})
