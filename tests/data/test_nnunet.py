import json
import logging
import shutil
from pathlib import Path

import pytest

from medssl3d.cli import main
from medssl3d.data.datalist import load_datalist
from medssl3d.data.errors import DatalistError, InputError
from medssl3d.data.folder_scan import scan_folder, scan_folder_report
from medssl3d.data.nnunet import decathlon_labels, is_nnunet_root

TWO_CLASSES = {"0": "background", "1": "liver"}


def test_v2_dataset_gives_splits_subjects_classes_and_test(nnunet_dataset, caplog):
    root = nnunet_dataset()
    with caplog.at_level(logging.WARNING, logger="medssl3d.data.nnunet"):
        scan = scan_folder_report(root, val_fraction=0.34, seed=0)
    dl = scan.datalist
    assert dl["name"] == "Dataset001_Phantom" and dl["modality"] == {"0": "CT"} and dl["labels"] == TWO_CLASSES
    labelled = sorted(dl["training"] + dl["validation"], key=lambda e: e["subject"])
    assert labelled == [
        {"image": f"imagesTr/{c}_0000.nii.gz", "subject": c, "label": f"labelsTr/{c}.nii.gz"} for c in "abc"
    ]
    assert len(dl["validation"]) == 1 and dl["unlabeled"] == []
    assert dl["test"] == [{"image": "imagesTs/t_0000.nii.gz", "subject": "t"}]
    assert scan.unmatched_labels == ("labelsTr/ghost.nii.gz",)
    assert "labelsTr/ghost.nii.gz" in caplog.text
    assert "1 label file(s) match no image: labelsTr/ghost.nii.gz" in scan.summary()
    assert "classes: 0 background, 1 liver" in scan.summary()


def test_written_datalist_loads(nnunet_dataset, tmp_path):
    root = nnunet_dataset()
    out = tmp_path / "lists" / "datalist.json"
    assert main(["datalist", str(root), "-o", str(out)]) == 0
    entries = load_datalist(out, splits=("training", "validation"))
    assert sorted(e["subject"] for e in entries) == ["a", "b", "c"]
    (test,) = load_datalist(out, splits="test", keys="image")
    assert Path(test["image"]).resolve() == (root / "imagesTs" / "t_0000.nii.gz").resolve()


def test_cli_prints_the_summary_and_keeps_dataset_json(nnunet_dataset, capsys):
    root = nnunet_dataset()
    before = (root / "dataset.json").read_text()
    assert main(["datalist", str(root), "-o", str(root / "dataset.json")]) == 2
    assert (root / "dataset.json").read_text() == before
    assert main(["datalist", str(root), "-o", str(root / "datalist.json")]) == 0
    printed = capsys.readouterr().out
    assert "1 test" in printed and "labelsTr/ghost.nii.gz" in printed and "0 background, 1 liver" in printed


def test_v1_labels_and_modality(nnunet_dataset):
    root = nnunet_dataset(channel_names=None, file_ending=None, modality={"0": "MRI"}, labels=TWO_CLASSES)
    dl = scan_folder(root)
    assert dl["labels"] == TWO_CLASSES and dl["modality"] == {"0": "MRI"}
    assert {e["image"] for e in dl["training"] + dl["validation"]} == {f"imagesTr/{c}_0000.nii.gz" for c in "abc"}


def test_multi_channel_lists_one_channel_and_says_so(nnunet_dataset, caplog):
    root = nnunet_dataset(channels=("T2", "ADC"))
    with caplog.at_level(logging.WARNING, logger="medssl3d.data.nnunet"):
        scan = scan_folder_report(root, val_fraction=0.0)
    assert [e["image"] for e in scan.datalist["training"]] == [f"imagesTr/{c}_0000.nii.gz" for c in "abc"]
    assert scan.datalist["modality"] == {"0": "T2"}
    (note,) = scan.notes
    assert "2 channels" in note and "0000: T2, 0001: ADC" in note and "--channel" in note
    assert note in caplog.text
    adc = scan_folder(root, val_fraction=0.0, channel=1)
    assert adc["modality"] == {"0": "ADC"} and adc["test"][0]["image"] == "imagesTs/t_0001.nii.gz"
    with pytest.raises(InputError, match="no channel 2; the dataset has 0000: T2, 0001: ADC"):
        scan_folder(root, channel=2)


def test_missing_channel_and_missing_suffix_reported_together(nnunet_dataset):
    root = nnunet_dataset(channels=("T2", "ADC"))
    (root / "imagesTr" / "b_0001.nii.gz").unlink()
    shutil.copy(root / "imagesTr" / "a_0000.nii.gz", root / "imagesTr" / "plain.nii.gz")
    with pytest.raises(DatalistError) as info:
        scan_folder(root, channel=1)
    problems = "\n".join(info.value.problems)
    assert len(info.value.problems) == 2
    assert "plain.nii.gz: no channel suffix" in problems and "case 'b' has no channel 0001" in problems


def test_decathlon_task_of_4d_files(nnunet_dataset):
    root = nnunet_dataset(channels=("FLAIR",), channel_names=None, modality={"0": "FLAIR", "1": "T1w"},
                          labels=TWO_CLASSES, file_ending=None)
    for folder in ("imagesTr", "imagesTs"):  # the Decathlon's names: one file per case, no channel suffix
        for f in (root / folder).iterdir():
            f.rename(f.with_name(f.name.replace("_0000", "")))
    scan = scan_folder_report(root, val_fraction=0.0)
    assert [e["image"] for e in scan.datalist["training"]] == [f"imagesTr/{c}.nii.gz" for c in "abc"]
    assert scan.datalist["modality"] == {"0": "FLAIR", "1": "T1w"}
    assert any("4D" in note and "allow_4d_index" in note for note in scan.notes)


def test_region_based_labels_list_the_images_without_classes(nnunet_dataset):
    root = nnunet_dataset(labels={"background": 0, "tumour": [1, 2]})
    scan = scan_folder_report(root)
    assert "labels" not in scan.datalist and len(scan.datalist["training"] + scan.datalist["validation"]) == 3
    assert any(note.startswith("classes not listed: 'labels' are region-based") for note in scan.notes)


def test_medssl3d_datalist_named_dataset_json_is_not_an_nnunet_description(nnunet_dataset):
    root = nnunet_dataset()
    (root / "dataset.json").write_text(json.dumps({"training": [], "labels": TWO_CLASSES}))
    assert not is_nnunet_root(root)
    assert scan_folder(root)["test"] == [{"image": "imagesTs/t_0000.nii.gz", "subject": "t_0000"}]


@pytest.mark.parametrize(
    "labels",
    [{"background": 0, "liver": 1}, {"0": "background", "1": "liver"}, {"liver": 1, "background": 0}],
)
def test_decathlon_labels_reads_both_orientations(labels):
    assert decathlon_labels(labels, "d.json") == TWO_CLASSES


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        ({"background": 0, "tumour": [1, 2]}, r"region-based \(tumour: \[1, 2\]\)"),
        ({"background": 0, "a": 1, "b": 1}, r"value\(s\) \[1\] more than one name"),
        ({"0": "background", "liver": 1}, "must map names to values"),
        ({}, "non-empty"),
    ],
)
def test_decathlon_labels_refuses_what_it_cannot_train(labels, match):
    with pytest.raises(InputError, match=match) as info:
        decathlon_labels(labels, "d.json")
    assert info.value.path == "d.json"
