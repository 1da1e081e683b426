import json

import nibabel as nib
import numpy as np
import pytest

from medssl3d.bundle_support import labels
from medssl3d.bundle_support.labels import check_label_values, checked_split, default_label_names
from medssl3d.data.datalist import write_datalist
from medssl3d.data.errors import DatalistError, InputError
from medssl3d.data.folder_scan import scan_folder

TWO_CLASSES = {"0": "background", "1": "liver"}
PHANTOM_CLASSES = {"0": "background", "1": "body", "2": "fat"}


@pytest.fixture
def metadata(tmp_path):
    path = tmp_path / "metadata.json"
    path.write_text(json.dumps({"network_data_format": {"outputs": {"pred": {"channel_def": PHANTOM_CLASSES}}}}))
    return path


@pytest.fixture
def datalist(nnunet_dataset, tmp_path):
    """The datalist of a 2-class nnU-Net dataset (3 training cases: a, b, c; one validation)."""
    root = nnunet_dataset()
    return write_datalist(scan_folder(root, val_fraction=0.34, relative_to=tmp_path), tmp_path / "datalist.json")


def _set_value(label_file, value):
    img = nib.load(str(label_file))
    data = np.asarray(img.dataobj).astype(np.float32)
    data.flat[0] = value
    nib.save(nib.Nifti1Image(data, img.affine), str(label_file))


def test_classes_from_the_datalist_or_an_nnunet_dataset_json(datalist, nnunet_dataset, metadata):
    assert default_label_names(datalist, metadata) == TWO_CLASSES
    dataset_json = nnunet_dataset("Dataset002_V2") / "dataset.json"  # name -> value
    assert default_label_names(dataset_json, metadata) == TWO_CLASSES


def test_classes_from_the_metadata_without_labels_or_datalist(tmp_path, metadata):
    plain = write_datalist({"training": [{"image": "a.nii.gz"}]}, tmp_path / "plain.json")
    assert default_label_names(plain, metadata) == PHANTOM_CLASSES
    assert default_label_names(tmp_path / "not_yet.json", metadata) == PHANTOM_CLASSES


@pytest.mark.parametrize(
    ("classes", "match"),
    [
        ({"0": "background", "2": "liver"}, r"0, 1, \.\.\., K-1"),
        ({"0": "background"}, "two or more"),
        ({"background": 0, "liver": 1, "ignore": 2}, "'ignore' label"),
        ({"background": 0, "tumour": [1, 2]}, "region-based"),
    ],
)
def test_classes_that_cannot_be_trained_are_refused(tmp_path, metadata, classes, match):
    path = write_datalist({"labels": classes, "training": []}, tmp_path / "d.json")
    with pytest.raises(InputError, match=match) as info:
        default_label_names(path, metadata)
    assert info.value.path == str(path)


def test_label_values_outside_the_classes_are_listed_in_one_error(datalist, tmp_path):
    root = tmp_path / "Dataset001_Phantom"
    _set_value(root / "labelsTr" / "a.nii.gz", 5)
    _set_value(root / "labelsTr" / "c.nii.gz", 5)
    with pytest.raises(DatalistError) as info:
        check_label_values(datalist, TWO_CLASSES)
    problems = info.value.problems
    assert len(problems) == 2
    for name, problem in zip(("a.nii.gz", "c.nii.gz"), sorted(problems), strict=True):
        assert f"labelsTr/{name}: value(s) 5 are not among the 2 classes" in problem
    assert str(datalist) in str(info.value)


def test_unreadable_labels_are_listed_with_bad_values(datalist, tmp_path):
    root = tmp_path / "Dataset001_Phantom"
    _set_value(root / "labelsTr" / "a.nii.gz", 0.5)
    (root / "labelsTr" / "b.nii.gz").unlink()
    with pytest.raises(DatalistError) as info:
        check_label_values(datalist, TWO_CLASSES)
    problems = "\n".join(info.value.problems)
    assert len(info.value.problems) == 2
    assert "b.nii.gz" in problems and "not found" in problems and "value(s) 0.5 are not" in problems


def test_each_label_is_read_once(datalist, monkeypatch):
    reads = []
    real = labels.load_array
    monkeypatch.setattr(labels, "load_array", lambda path: reads.append(path) or real(path))
    check_label_values(datalist, TWO_CLASSES)
    assert sorted(p.rsplit("/", 1)[-1] for p in reads) == ["a.nii.gz", "b.nii.gz", "c.nii.gz"]
    entries = checked_split(datalist, TWO_CLASSES, "validation")
    assert len(entries) == 1 and len(reads) == 3


def test_missing_splits_are_not_checked(tmp_path):
    path = write_datalist({"unlabeled": [{"image": "x.nii.gz"}]}, tmp_path / "d.json")
    assert check_label_values(path, TWO_CLASSES) is None
