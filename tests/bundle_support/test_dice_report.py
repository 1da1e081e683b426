"""The Dice report: per-class means over cases, a class absent from every case left out of the overall mean."""

import json
import math
from types import SimpleNamespace

import torch
from monai.data import MetaTensor

from medssl3d.bundle_support.dice_report import DicePerClassWriter


def _engine(details, names):
    batch = [{"image": MetaTensor(torch.zeros(1, 2, 2, 2), meta={"filename_or_obj": n})} for n in names]
    return SimpleNamespace(state=SimpleNamespace(batch=batch, metric_details={"val_mean_dice": details}))


def test_absent_class_has_no_dice_and_stays_out_of_the_mean(tmp_path):
    writer = DicePerClassWriter(tmp_path, {"0": "background", "1": "lung", "2": "heart", "3": "ribs"})
    # heart is absent from both cases' label and prediction (NaN): the validation slab of the chest CT
    details = torch.tensor([[0.8, math.nan, 0.4], [0.6, math.nan, 0.2]], dtype=torch.float64)
    engine = _engine(details, ["a.nii.gz", "b.nii.gz"])
    writer._reset(engine)
    writer._collect_names(engine)
    writer(engine)
    report = json.loads((tmp_path / "dice_per_class.json").read_text())
    per_class = report["per_class"]
    assert per_class["heart"] is None
    assert math.isclose(per_class["lung"], 0.7, rel_tol=1e-6) and math.isclose(per_class["ribs"], 0.3, rel_tol=1e-6)
    assert math.isclose(report["mean"], 0.5, rel_tol=1e-6)
    assert [c["image"] for c in report["cases"]] == ["a.nii.gz", "b.nii.gz"]
    assert report["cases"][0]["heart"] is None
