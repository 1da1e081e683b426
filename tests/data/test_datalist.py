import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medssl3d.data.datalist import load_datalist, load_datalist_report, write_datalist
from medssl3d.data.errors import DatalistError, InputError
from medssl3d.data.folder_scan import scan_folder, scan_folder_report, split_cases
from medssl3d.data.phantoms import make_phantom, write_case, write_dicom_series, write_nifti

SHAPE = (32, 32, 32)
UID_A = "1.2.826.0.1.3680043.8.498.1"
UID_B = "1.2.826.0.1.3680043.8.498.2"


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(SHAPE, modality="ct", seed=1, deform=False)


@pytest.fixture(scope="module")
def tree(tmp_path_factory, phantom):
    """Mixed dataset: NIfTI with/without labels, nested and Decathlon folders, DICOM (1 and 2 series)."""
    root = tmp_path_factory.mktemp("mixed")
    write_case(root, "a", phantom)  # a.nii.gz + a_seg.nii.gz
    write_case(root, "b", phantom, with_label=False)
    write_case(root / "sub" / "deeper", "c", phantom)
    write_case(root, "e", phantom, fmt="mha", with_label=False)
    write_case(root, "patient1", phantom, fmt="dicom")  # folder patient1/ + patient1_seg.nii.gz
    write_nifti(phantom.image, phantom.affine, root / "imagesTr" / "d.nii.gz")
    write_nifti(phantom.label, phantom.affine, root / "labelsTr" / "d.nii.gz")
    # Two series in one folder: write each apart (same file names), then move them in with a prefix.
    for tag, uid in (("s1", UID_A), ("s2", UID_B)):
        tmp = write_dicom_series(phantom.image, phantom.affine, root / f".tmp_{tag}", series_uid=uid)
        (root / "multi").mkdir(exist_ok=True)
        for f in sorted(tmp.iterdir()):
            f.rename(root / "multi" / f"{tag}_{f.name}")
        tmp.rmdir()
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    write_nifti(phantom.image, phantom.affine, root / ".hidden" / "x.nii.gz")
    return root


def test_scan_finds_every_case_and_label(tree):
    dl = scan_folder(tree, val_fraction=0.25, seed=0, modality="CT")
    assert dl["name"] == tree.name and dl["modality"] == {"0": "CT"}
    labelled = sorted(dl["training"] + dl["validation"], key=lambda e: e["image"])
    assert labelled == [
        {"image": "a.nii.gz", "label": "a_seg.nii.gz", "subject": "a"},
        {"image": "imagesTr/d.nii.gz", "label": "labelsTr/d.nii.gz", "subject": "d"},
        {"image": "patient1", "label": "patient1_seg.nii.gz", "subject": "patient1"},
        {"image": "sub/deeper/c.nii.gz", "label": "sub/deeper/c_seg.nii.gz", "subject": "c"},
    ]
    assert len(dl["validation"]) == 1
    assert dl["unlabeled"] == [
        {"image": "b.nii.gz", "subject": "b"},
        {"image": "e.mha", "subject": "e"},
        {"image": "multi", "series_uid": UID_A, "subject": "multi"},
        {"image": "multi", "series_uid": UID_B, "subject": "multi"},
    ]
    assert dl["test"] == [] and "labels" not in dl


def test_scan_custom_suffix_and_relative_to(tmp_path, phantom):
    write_nifti(phantom.image, phantom.affine, tmp_path / "data" / "x.nii")
    write_nifti(phantom.label, phantom.affine, tmp_path / "data" / "x_label.nii.gz")
    dl = scan_folder(tmp_path / "data", val_fraction=0.0, relative_to=tmp_path)
    assert dl["training"] == [{"image": "data/x.nii", "label": "data/x_label.nii.gz", "subject": "x"}]
    # With only "_seg" as label suffix the "_label" file is an image of its own and x is unlabeled.
    dl = scan_folder(tmp_path / "data", label_suffixes="_seg", val_fraction=0.0)
    assert dl["training"] == [] and len(dl["unlabeled"]) == 2


def test_label_maps_are_never_images_and_unmatched_ones_are_reported(tmp_path, phantom, caplog):
    write_case(tmp_path, "a", phantom)
    write_nifti(phantom.label, phantom.affine, tmp_path / "lost_mask.nii.gz")  # a label map beside no image
    write_nifti(phantom.image, phantom.affine, tmp_path / "images" / "b.nii.gz")
    write_nifti(phantom.label, phantom.affine, tmp_path / "labels" / "b.nii.gz")
    write_nifti(phantom.label, phantom.affine, tmp_path / "labels" / "gone.nii.gz")
    with caplog.at_level(logging.WARNING, logger="medssl3d.data.folder_scan"):
        scan = scan_folder_report(tmp_path, val_fraction=0.0)
    images = [e["image"] for split in ("training", "validation", "unlabeled", "test") for e in scan.datalist[split]]
    assert sorted(images) == ["a.nii.gz", "images/b.nii.gz"]
    assert scan.unmatched_labels == ("labels/gone.nii.gz", "lost_mask.nii.gz")
    assert "2 label file(s) match no image" in caplog.text and "labels/gone.nii.gz" in caplog.text
    assert "2 label file(s) match no image: labels/gone.nii.gz, lost_mask.nii.gz" in scan.summary()


def test_images_ts_is_the_test_split_and_subjects_stay_unique(tmp_path, phantom):
    for patient in ("p1", "p2"):
        write_case(tmp_path / patient, "ct", phantom)  # two cases named "ct"
    write_nifti(phantom.image, phantom.affine, tmp_path / "imagesTs" / "t.nii.gz")
    write_nifti(phantom.label, phantom.affine, tmp_path / "labelsTs" / "t.nii.gz")
    dl = scan_folder(tmp_path, val_fraction=0.0)
    assert [e["subject"] for e in dl["training"]] == ["p1/ct", "p2/ct"]
    assert dl["test"] == [{"image": "imagesTs/t.nii.gz", "label": "labelsTs/t.nii.gz", "subject": "t"}]
    assert dl["unlabeled"] == [] and dl["validation"] == []


def test_nnunet_like_folder_without_dataset_json_is_a_plain_folder(tmp_path, phantom):
    write_nifti(phantom.image, phantom.affine, tmp_path / "imagesTr" / "case_0000.nii.gz")
    write_nifti(phantom.label, phantom.affine, tmp_path / "labelsTr" / "case.nii.gz")
    scan = scan_folder_report(tmp_path)
    assert scan.datalist["unlabeled"] == [{"image": "imagesTr/case_0000.nii.gz", "subject": "case_0000"}]
    assert scan.unmatched_labels == ("labelsTr/case.nii.gz",)
    assert any("dataset.json" in note for note in scan.notes)


def test_scan_rejects_empty_folder_and_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images found"):
        scan_folder(tmp_path / "empty")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        scan_folder(tmp_path / "f.txt")


def _cases(n):
    return [{"image": f"case_{i:03d}.nii.gz", "label": f"case_{i:03d}_seg.nii.gz"} for i in range(n)]


def test_split_is_deterministic_order_free_and_sized():
    cases = _cases(20)
    train, val = split_cases(cases, val_fraction=0.2, seed=3)
    assert len(val) == 4 and len(train) == 16
    assert {c["image"] for c in train} | {c["image"] for c in val} == {c["image"] for c in cases}
    assert not {c["image"] for c in train} & {c["image"] for c in val}
    assert split_cases(list(reversed(cases)), val_fraction=0.2, seed=3) == (train, val)
    other_seeds = {
        tuple(c["image"] for c in split_cases(cases, val_fraction=0.2, seed=s)[1]) for s in range(5)
    }
    assert len(other_seeds) > 1


def test_split_is_stable_when_cases_are_added():
    train, val = split_cases(_cases(30), val_fraction=0.2, seed=0)
    train2, val2 = split_cases(_cases(31), val_fraction=0.2, seed=0)
    old_val, new_val = {c["image"] for c in val}, {c["image"] for c in val2}
    assert len(old_val - new_val) <= 1


@pytest.mark.parametrize(("n", "fraction", "n_val"), [(1, 0.2, 0), (2, 0.1, 1), (5, 0.0, 0), (10, 0.95, 9)])
def test_split_edge_sizes(n, fraction, n_val):
    assert len(split_cases(_cases(n), val_fraction=fraction, seed=0)[1]) == n_val


def test_split_rejects_bad_fraction():
    with pytest.raises(ValueError, match="val_fraction"):
        split_cases(_cases(3), val_fraction=1.0, seed=0)


def test_write_is_atomic_roundtrip(tmp_path):
    path = tmp_path / "out" / "dataset.json"
    write_datalist({"training": [{"image": "a"}]}, path)
    write_datalist({"training": [{"image": "b"}]}, path)  # overwrite in place
    assert json.loads(path.read_text()) == {"training": [{"image": "b"}]}
    assert sorted(p.name for p in path.parent.iterdir()) == ["dataset.json"]  # no temp file left


def test_write_failure_keeps_old_file(tmp_path):
    path = write_datalist({"training": []}, tmp_path / "d.json")
    with pytest.raises(TypeError):
        write_datalist({"training": [object()]}, path)
    assert json.loads(path.read_text()) == {"training": []}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.json"]


def test_scan_write_load_roundtrip(tree, tmp_path):
    path = write_datalist(scan_folder(tree, val_fraction=0.25), tree / "dataset.json")
    try:
        labelled = load_datalist(path, splits=("training", "validation"), min_shape=SHAPE)
        assert len(labelled) == 4
        for e in labelled:
            assert Path(e["image"]).is_absolute() and Path(e["image"]).exists() and Path(e["label"]).exists()
        everything = load_datalist(path, splits=("training", "validation", "unlabeled"), keys=("image",))
        assert len(everything) == 8
        multi = [e for e in everything if "series_uid" in e]
        assert [e["series_uid"] for e in multi] == [UID_A, UID_B]
    finally:
        path.unlink()


def test_relative_paths_follow_base_dir(tmp_path, phantom):
    write_case(tmp_path / "data", "a", phantom)
    dl = {"training": [{"image": "a.nii.gz", "label": "a_seg.nii.gz"}]}
    path = write_datalist(dl, tmp_path / "lists" / "dl.json")
    with pytest.raises(DatalistError, match="file not found"):
        load_datalist(path)
    (entry,) = load_datalist(path, base_dir=tmp_path / "data")
    assert entry["image"] == str((tmp_path / "data" / "a.nii.gz").resolve())


@pytest.fixture()
def bad_datalist(tmp_path, phantom):
    """One good case and five bad ones, each bad in a different way."""
    write_case(tmp_path, "good", phantom)
    write_case(tmp_path, "shifted", phantom)
    shifted = phantom.affine.copy()
    shifted[:3, 3] += 10.0
    write_nifti(phantom.label, shifted, tmp_path / "shifted_seg.nii.gz")  # label off the image grid
    write_nifti(phantom.image[:, :, 16], np.diag([1.5, 1.5, 1.5, 1.0]), tmp_path / "flat.nii.gz")  # 2D
    small = make_phantom((32, 32, 8), seed=2)
    write_case(tmp_path, "small", small)
    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    dl = {
        "training": [
            {"image": "good.nii.gz", "label": "good_seg.nii.gz"},
            {"image": "missing.nii.gz", "label": "good_seg.nii.gz"},
            {"image": "shifted.nii.gz", "label": "shifted_seg.nii.gz"},
            {"image": "flat.nii.gz", "label": "good_seg.nii.gz"},
            {"image": "small.nii.gz", "label": "small_seg.nii.gz"},
            {"image": "broken.nii.gz", "label": "good_seg.nii.gz"},
            {"image": "good.nii.gz"},
        ]
    }
    return write_datalist(dl, tmp_path / "dataset.json")


def test_load_reports_all_problems_at_once(bad_datalist):
    with pytest.raises(DatalistError) as info:
        load_datalist(bad_datalist, min_shape=(16, 16, 16))
    problems = [str(p) for p in info.value.problems]
    assert len(problems) == 6
    expected = [
        "missing.nii.gz",
        "shifted_seg.nii.gz",
        "flat.nii.gz",
        "small.nii.gz",
        "broken.nii.gz",
        "'label'",
    ]
    for needle, problem in zip(expected, problems, strict=True):
        assert needle in problem
    assert "training[1]" in problems[0] and "not found" in problems[0]
    assert "min_shape" in problems[3]
    assert str(bad_datalist) in str(info.value)
    assert "good.nii.gz" not in "".join(problems[:5])


def test_skip_bad_report_and_log(bad_datalist, caplog):
    good, bad = load_datalist_report(bad_datalist, min_shape=(16, 16, 16))
    assert [Path(e["image"]).name for e in good] == ["good.nii.gz"]
    assert len(bad) == 6 and all(isinstance(reason, str) for _, reason in bad)
    assert Path(bad[0][0]["image"]).name == "missing.nii.gz"
    with caplog.at_level(logging.WARNING, logger="medssl3d.data.datalist"):
        kept = load_datalist(bad_datalist, skip_bad=True, min_shape=(16, 16, 16))
    assert kept == good
    assert "skipped 6 of 7" in caplog.text and "missing.nii.gz" in caplog.text


def test_skip_bad_with_nothing_good_still_raises(tmp_path):
    path = write_datalist(
        {"training": [{"image": "nope.nii.gz", "label": "nope_seg.nii.gz"}]}, tmp_path / "d.json"
    )
    with pytest.raises(DatalistError, match="1 problem"):
        load_datalist(path, skip_bad=True)


def test_validate_false_checks_structure_only(bad_datalist):
    good, bad = load_datalist_report(bad_datalist, validate=False)
    assert len(good) == 6 and len(bad) == 1 and "'label'" in bad[0][1]


def test_malformed_json_names_file_line_and_column(tmp_path):
    path = tmp_path / "dataset.json"
    path.write_text('{\n  "training": [\n    {"image": "a.nii.gz",}\n  ]\n}\n')
    with pytest.raises(InputError, match=r"malformed JSON at line 3, column \d+") as info:
        load_datalist(path)
    assert info.value.path == str(path)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ({"training": []}, "empty datalist"),
        ({"training": [], "validation": []}, "empty datalist"),
        ({"validation": [{"image": "a"}]}, r"no split 'training'.*validation"),
        ({"training": {"image": "a"}}, "must be a list"),
        ([{"image": "a"}], "JSON object"),
    ],
)
def test_datalist_level_errors(tmp_path, content, match):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(content))
    with pytest.raises(InputError, match=match):
        load_datalist(path, validate=False)


def test_missing_datalist_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_datalist(tmp_path / "nope.json")


def test_decathlon_test_split_of_plain_paths(tmp_path, phantom):
    write_case(tmp_path, "t", phantom, with_label=False)
    path = write_datalist({"test": ["t.nii.gz"]}, tmp_path / "d.json")
    assert load_datalist(path, splits="test", keys="image") == [
        {"image": str((tmp_path / "t.nii.gz").resolve())}
    ]


def test_dicom_folder_with_two_series_needs_the_uid(tree, tmp_path):
    dl = {"unlabeled": [{"image": str(tree / "multi")}, {"image": str(tree / "multi"), "series_uid": UID_B}]}
    path = write_datalist(dl, tmp_path / "d.json")
    good, bad = load_datalist_report(path, splits="unlabeled", keys="image")
    assert [e.get("series_uid") for e in good] == [UID_B]
    assert len(bad) == 1 and "multi" in bad[0][1]


def test_4d_image_refused_unless_allowed(tmp_path, phantom):
    vol4 = np.stack([phantom.image, phantom.image], axis=-1)
    nib.save(nib.Nifti1Image(vol4, phantom.affine), str(tmp_path / "four.nii.gz"))
    path = write_datalist({"training": [{"image": "four.nii.gz"}]}, tmp_path / "d.json")
    with pytest.raises(DatalistError, match="4D"):
        load_datalist(path, keys="image")
    assert len(load_datalist(path, keys="image", allow_4d_index=0)) == 1


def test_copy_of_tree_is_scanned_identically(tree, tmp_path):
    copy = shutil.copytree(tree, tmp_path / "copy")
    a, b = scan_folder(tree, seed=7), scan_folder(copy, seed=7)
    assert {k: v for k, v in a.items() if k != "name"} == {k: v for k, v in b.items() if k != "name"}
