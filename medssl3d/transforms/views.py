"""Two augmented views of one volume: the pair of views of contrastive pretraining."""

from __future__ import annotations

from collections.abc import Sequence

from monai.transforms import (
    Compose,
    CopyItemsd,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    SpatialPadd,
)

__all__ = ["DEFAULT_ROI", "VIEW_KEYS", "two_views"]

DEFAULT_ROI = (64, 64, 64)
VIEW_KEYS = ("view1", "view2")
DEFAULT_FLIP_PROB = 0.5
# Only the left-right axis, out of the default A-S rotation plane (see transforms.rotation), is flipped by
# default: flipping both in-plane axes is a 180-degree turn, which would contradict the rotation label.
DEFAULT_FLIP_AXES = (0,)
DEFAULT_INTENSITY_PROB = 0.8
DEFAULT_SCALE_FACTOR = 0.1  # intensity multiplied by 1 + U(-0.1, 0.1)
DEFAULT_SHIFT_OFFSET = 0.1  # plus U(-0.1, 0.1), on images scaled to [0, 1]


def two_views(
    roi_size: Sequence[int] = DEFAULT_ROI,
    *,
    source_key: str = "image",
    view_keys: Sequence[str] = VIEW_KEYS,
    independent_crops: bool = False,
    flip_prob: float = DEFAULT_FLIP_PROB,
    flip_axes: Sequence[int] = DEFAULT_FLIP_AXES,
    intensity_prob: float = DEFAULT_INTENSITY_PROB,
    scale_factor: float = DEFAULT_SCALE_FACTOR,
    shift_offset: float = DEFAULT_SHIFT_OFFSET,
) -> Compose:
    """Build a transform adding augmented copies of one random crop of ``source_key`` under ``view_keys``.

    One random ``roi_size`` crop is taken from the volume (padded first if the volume is smaller) and
    copied to every view key; with ``independent_crops`` each view is its own random crop instead. Each
    view is then flipped along each of ``flip_axes`` and jittered in intensity (scale and shift), each
    with its own draws. The source is kept; every draw goes through MONAI's ``self.R`` so
    ``set_determinism`` / ``set_random_state`` make it repeatable.

    Args:
        roi_size: spatial size of each view, along the (R, A, S) axes of a RAS-oriented volume.
        source_key: key of the preprocessed channel-first volume (1, R, A, S), intensities in [0, 1].
        view_keys: names of the views (two for contrastive pretraining; any number works).
        independent_crops: give each view its own random crop (they may then share no voxel).
        flip_prob: probability of flipping each view along each of ``flip_axes``.
        flip_axes: spatial axes (0, 1, 2) = (R, A, S) that may be flipped.
        intensity_prob: probability of each of the scale and the shift jitter.
        scale_factor: intensities are multiplied by ``1 + U(-scale_factor, scale_factor)``.
        shift_offset: intensities are shifted by ``U(-shift_offset, shift_offset)``.

    Returns:
        A ``Compose`` mapping ``{source_key: (1, R, A, S), ...}`` to the same dict plus
        ``{view_key: (1, *roi_size)}`` for every view key.

    Raises:
        ValueError: an empty or non-positive ``roi_size``, fewer than one view key, or a view key equal to
            ``source_key``.
    """
    roi = tuple(int(s) for s in roi_size)
    if not roi or min(roi) < 1:
        raise ValueError(f"roi_size must be positive sizes, got {roi_size}")
    views = list(view_keys)
    if not views or source_key in views:
        raise ValueError(f"view_keys must be at least one key other than {source_key!r}, got {view_keys}")
    crop_keys = views if independent_crops else views[:1]
    crops: list = [
        CopyItemsd(keys=source_key, times=len(crop_keys), names=crop_keys),
        *(RandSpatialCropd(keys=key, roi_size=roi, random_size=False) for key in crop_keys),
    ]
    if not independent_crops and len(views) > 1:
        crops.append(CopyItemsd(keys=views[0], times=len(views) - 1, names=views[1:]))
    per_view = []
    for key in views:
        per_view.extend(RandFlipd(keys=key, prob=flip_prob, spatial_axis=axis) for axis in flip_axes)
        per_view.append(RandScaleIntensityd(keys=key, factors=scale_factor, prob=intensity_prob))
        per_view.append(RandShiftIntensityd(keys=key, offsets=shift_offset, prob=intensity_prob))
    return Compose([SpatialPadd(keys=source_key, spatial_size=roi), *crops, *per_view])
