"""HD95 and surface Dice in millimetres for the segmentation bundle's evaluation.

MONAI's ``HausdorffDistanceMetric`` and ``SurfaceDiceMetric`` measure in voxels unless they are given the
voxel spacing, and MONAI's ignite metric handler passes only ``(y_pred, y)``. These subclasses take the
spacing from each label's affine (a ``MetaTensor``: the evaluation runs on the preset's grid), so distances
and surface-Dice tolerances are in mm on any grid.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.metrics import HausdorffDistanceMetric, SurfaceDiceMetric

SPATIAL_DIMS = 3


def voxel_spacing(label: torch.Tensor) -> list[float]:
    """Voxel sizes in mm (column norms of the affine) of a ``(B, C, D, H, W)`` or ``(C, D, H, W)`` label.

    Raises:
        ValueError: ``label`` is not a ``MetaTensor`` (it carries no affine).
    """
    if not isinstance(label, MetaTensor):
        raise ValueError(f"a distance in mm needs the label's affine; got a {type(label).__name__}, not a MetaTensor")
    affine = label.affine
    affine = affine[0] if affine.ndim == 3 else affine
    return [float(s) for s in affine_to_spacing(affine, r=SPATIAL_DIMS)]


class _SpacingFromLabel:
    """Mixin: call the metric with ``spacing`` read from the label's affine."""

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return super()._compute_tensor(y_pred, y, spacing=voxel_spacing(y), **kwargs)


class HausdorffDistanceMM(_SpacingFromLabel, HausdorffDistanceMetric):
    """MONAI ``HausdorffDistanceMetric`` (e.g. ``percentile=95`` for HD95) in mm, per case and class.

    Inputs are one-hot ``(B, C, D, H, W)`` prediction and label; the label must be a ``MetaTensor``. A class
    missing from the prediction or the label gives ``inf`` / ``nan`` (MONAI's convention), which reports leave
    out of their means.
    """


class SurfaceDiceMM(_SpacingFromLabel, SurfaceDiceMetric):
    """MONAI ``SurfaceDiceMetric`` (normalised surface Dice) with ``class_thresholds`` in mm.

    Inputs are one-hot ``(B, C, D, H, W)`` prediction and label; the label must be a ``MetaTensor``.
    """
