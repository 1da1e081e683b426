"""View generation of DiRA-3D: two random crops of a volume, each with its distorted copy.

The restoration targets and the distorted inputs of :class:`medssl3d.methods.dira.DiRA`; the reference
is ``docs/methods.md`` (section "DiRA-3D").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from monai.transforms import (
    Compose,
    CopyItemsd,
    DeleteItemsd,
    EnsureTyped,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    Resized,
    SpatialPadd,
)

from medssl3d.transforms.genesis import distortions
from medssl3d.transforms.views import (
    DEFAULT_INTENSITY_PROB,
    DEFAULT_SCALE_FACTOR,
    DEFAULT_SHIFT_OFFSET,
    VIEW_KEYS,
)
from medssl3d.transforms.volume_id import DEFAULT_VOLUME_KEY, VolumeIdd

__all__ = ["DISTORTED_POSTFIX", "dira_transforms"]

DISTORTED_POSTFIX = "_distorted"  # batch key of a view's distorted copy: "view1_distorted"
DEFAULT_DIRA_ROI = (96, 96, 96)
DEFAULT_SCALE_RANGE = (0.75, 1.25)  # crop side before resizing to the roi, per axis, relative to the roi
DEFAULT_FLIP_PROB = 0.5
DEFAULT_FLIP_AXES = (0, 1, 2)


def dira_transforms(
    roi: Sequence[int] = DEFAULT_DIRA_ROI,
    *,
    source_key: str = "image",
    view_keys: Sequence[str] = VIEW_KEYS,
    input_postfix: str = DISTORTED_POSTFIX,
    volume_key: str | None = DEFAULT_VOLUME_KEY,
    distortion: str = "genesis",
    distortion_probs: Mapping[str, float] | None = None,
    scale_range: tuple[float, float] = DEFAULT_SCALE_RANGE,
    flip_prob: float = DEFAULT_FLIP_PROB,
    flip_axes: Sequence[int] = DEFAULT_FLIP_AXES,
    intensity_prob: float = DEFAULT_INTENSITY_PROB,
    scale_factor: float = DEFAULT_SCALE_FACTOR,
    shift_offset: float = DEFAULT_SHIFT_OFFSET,
) -> Compose:
    """View generation of :class:`~medssl3d.methods.dira.DiRA`, from a loaded, preprocessed volume to a training sample.

    For each view: a random crop whose sides are ``U(scale_range) * roi`` (per axis), resized to
    ``roi`` (trilinear), random flips; this is the restoration target ``v``. Its copy
    ``v + input_postfix`` then gets intensity jitter (scale and shift) and the distortion mix
    ``distortion`` (:func:`~medssl3d.transforms.genesis.distortions`). The source volume's id goes
    under ``volume_key`` (:class:`~medssl3d.transforms.volume_id.VolumeIdd`), the source is dropped
    and MetaTensors become plain tensors. Pass the method's ``config.view_kwargs()`` so that keys and
    mix agree with it.

    Args:
        roi: view size, one side per spatial axis (R, A, S after the presets' RAS orientation).
        source_key: key of the volume (1, X, Y, Z), intensities in [0, 1] (a data preset's output).
        view_keys: the two view keys.
        input_postfix: suffix of the distorted views' keys.
        volume_key: key of the source volume's id (None: none written).
        distortion: the mix, "genesis" (Models-Genesis chain) or "exclusive" (official DiRA's).
        distortion_probs: probabilities of the mix that differ from its defaults, e.g.
            ``{"bezier_prob": 0.0}`` for "genesis" or ``{"shuffle_prob": 0.5}`` for "exclusive".
        scale_range: (low, high) crop side relative to ``roi`` before the resize.
        flip_prob: probability of flipping along each of ``flip_axes``.
        flip_axes: spatial axes that may be flipped.
        intensity_prob: probability of each of the scale and shift jitters.
        scale_factor: intensities multiplied by ``1 + U(-scale_factor, scale_factor)``.
        shift_offset: intensities shifted by ``U(-shift_offset, shift_offset)``.

    Returns:
        A ``Compose`` giving ``{v: (1, *roi), v + input_postfix: (1, *roi)}`` for each view key ``v``,
        and ``{volume_key: ()}`` (an int64 id).

    Raises:
        ValueError: a bad ``roi``, ``scale_range``, ``distortion`` or probability.
    """
    roi = tuple(int(s) for s in roi)
    lo, hi = (float(s) for s in scale_range)
    if not roi or min(roi) < 1:
        raise ValueError(f"roi must be positive sizes, got {roi}")
    if not 0.0 < lo <= hi:
        raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
    smallest = tuple(max(1, int(lo * s)) for s in roi)
    largest = tuple(max(1, int(round(hi * s))) for s in roi)
    per_view: list = []
    for v in view_keys:
        distorted = f"{v}{input_postfix}"
        per_view += [
            RandSpatialCropd(keys=v, roi_size=smallest, max_roi_size=largest, random_size=True),
            Resized(keys=v, spatial_size=roi, mode="trilinear"),
            *(RandFlipd(keys=v, prob=flip_prob, spatial_axis=axis) for axis in flip_axes),
            CopyItemsd(keys=v, names=distorted),
            RandScaleIntensityd(keys=distorted, factors=scale_factor, prob=intensity_prob),
            RandShiftIntensityd(keys=distorted, offsets=shift_offset, prob=intensity_prob),
            distortions(distortion, distorted, **dict(distortion_probs or {})),
        ]
    keys = [k for v in view_keys for k in (v, f"{v}{input_postfix}")]
    return Compose(
        [
            *([] if volume_key is None else [VolumeIdd(source_key, volume_key)]),
            SpatialPadd(keys=source_key, spatial_size=largest),
            CopyItemsd(keys=source_key, times=len(view_keys), names=list(view_keys)),
            *per_view,
            DeleteItemsd(keys=source_key),
            EnsureTyped(keys=keys, track_meta=False, dtype=torch.float32),
        ]
    )
