"""HD95 and surface Dice in mm: known answers for a box shifted by one voxel on anisotropic grids."""

import pytest
import torch
from monai.data import MetaTensor

from medssl3d.bundle_support.surface_metrics import HausdorffDistanceMM, SurfaceDiceMM, voxel_spacing


def _one_hot(box: tuple[slice, slice, slice], spacing: tuple[float, float, float]) -> MetaTensor:
    """(2, 20, 20, 20) background/foreground one-hot of a box, on a grid with ``spacing`` mm voxels."""
    fg = torch.zeros(20, 20, 20)
    fg[box] = 1
    return MetaTensor(torch.stack([1 - fg, fg]), affine=torch.diag(torch.tensor([*spacing, 1.0])))


@pytest.mark.parametrize(("spacing", "axis", "expected_mm"), [((2.0, 1.0, 1.0), 0, 2.0), ((2.0, 1.0, 1.0), 1, 1.0),
                                                              ((1.0, 1.0, 3.0), 2, 3.0)])
def test_hd95_is_the_shift_in_mm(spacing, axis, expected_mm):
    box = [slice(5, 15)] * 3
    label = _one_hot(tuple(box), spacing)
    box[axis] = slice(6, 16)
    pred = _one_hot(tuple(box), spacing)
    metric = HausdorffDistanceMM(include_background=False, percentile=95)
    metric([pred], [label])  # lists of (C, D, H, W), as the evaluator's handler passes them
    assert metric.aggregate().item() == pytest.approx(expected_mm)


def test_surface_dice_tolerance_is_in_mm():
    spacing = (2.0, 1.0, 1.0)
    label = _one_hot((slice(5, 15),) * 3, spacing)
    pred = _one_hot((slice(6, 16), slice(5, 15), slice(5, 15)), spacing)
    scores = {}
    for tolerance in (1.0, 2.5):
        metric = SurfaceDiceMM(class_thresholds=[tolerance], include_background=False)
        metric([pred], [label])
        scores[tolerance] = metric.aggregate().item()
    assert scores[2.5] == pytest.approx(1.0)  # every boundary voxel is within 2 mm of the other surface
    assert 0.0 < scores[1.0] < 1.0  # the faces moved by 2 mm are not within 1 mm


def test_spacing_needs_the_affine():
    assert voxel_spacing(_one_hot((slice(0, 1),) * 3, (0.5, 0.7, 1.2))[None]) == pytest.approx([0.5, 0.7, 1.2])
    with pytest.raises(ValueError, match="MetaTensor"):
        voxel_spacing(torch.zeros(1, 2, 4, 4, 4))
