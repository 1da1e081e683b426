"""N4 bias-field correction (Tustison et al., IEEE TMI 2010) with SimpleITK, as MONAI transforms."""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import SimpleITK as sitk
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import convert_to_dst_type

logger = logging.getLogger(__name__)

#: The bias field is fitted on the image shrunk by this factor per axis (it is smooth, so little is lost).
N4_SHRINK_FACTOR = 4
#: Maximum iterations per fitting level (one entry per level of the multi-resolution B-spline fit).
N4_ITERATIONS = (50, 50, 50, 50)
N4_CONVERGENCE_THRESHOLD = 1e-3
#: Histogram bins of the Otsu threshold that separates head/body from background for the fit mask.
OTSU_BINS = 200


class N4BiasFieldCorrection(Transform):
    """Divide each channel of a channel-first volume by its N4-estimated multiplicative bias field.

    The field is fitted on the foreground (an Otsu mask of the positive voxels) of a shrunken copy and
    evaluated at full resolution, which is the usual way to run N4 in a few seconds. The voxel spacing
    comes from the MetaTensor's affine when there is one (the field's smoothness is set in mm), else 1 mm.

    Args:
        shrink_factor: per-axis shrink factor for the fit (capped so every axis keeps at least 4 voxels).
        iterations: maximum iterations per fitting level.
        convergence_threshold: stop a level when the field changes less than this.

    Raises:
        ValueError: if ``shrink_factor < 1`` or ``iterations`` is empty or not positive.
    """

    def __init__(
        self,
        *,
        shrink_factor: int = N4_SHRINK_FACTOR,
        iterations: Sequence[int] = N4_ITERATIONS,
        convergence_threshold: float = N4_CONVERGENCE_THRESHOLD,
    ) -> None:
        if shrink_factor < 1:
            raise ValueError(f"shrink_factor must be >= 1, got {shrink_factor!r}")
        if not iterations or any(int(i) < 1 for i in iterations):
            raise ValueError(f"iterations must be a non-empty list of positive ints, got {iterations!r}")
        self.shrink_factor = int(shrink_factor)
        self.iterations = [int(i) for i in iterations]
        self.convergence_threshold = float(convergence_threshold)

    def _correct(self, volume: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
        # SimpleITK orders axes (x, y, z) = the array's axes reversed.
        image = sitk.GetImageFromArray(np.clip(volume, 0, None).astype(np.float32))
        image.SetSpacing([float(s) for s in reversed(spacing)])
        mask = sitk.OtsuThreshold(image, 0, 1, OTSU_BINS)
        if not np.any(sitk.GetArrayViewFromImage(mask)):
            logger.warning("N4: empty foreground mask; volume left uncorrected")
            return volume
        # Keep at least a few voxels per axis so the B-spline fit has something to fit.
        shrink = [max(1, min(self.shrink_factor, n // 4)) for n in image.GetSize()]
        small = sitk.Shrink(image, shrink)
        small_mask = sitk.Shrink(mask, shrink)
        corrector = sitk.N4BiasFieldCorrectionImageFilter()
        corrector.SetMaximumNumberOfIterations(self.iterations)
        corrector.SetConvergenceThreshold(self.convergence_threshold)
        corrector.Execute(small, small_mask)
        log_field = sitk.GetArrayFromImage(corrector.GetLogBiasFieldAsImage(image))
        return (volume / np.exp(log_field)).astype(volume.dtype, copy=False)

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        """Correct ``img`` of shape (C, D, H, W); returns the same type (MetaTensor meta kept)."""
        spacing = (1.0, 1.0, 1.0)
        if isinstance(img, MetaTensor):
            spacing = tuple(float(s) for s in img.pixdim[:3])
        arr = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
        arr = arr.astype(np.float32, copy=False)
        out = np.stack([self._correct(channel, spacing) for channel in arr])
        return convert_to_dst_type(
            out, img, dtype=torch.float32 if isinstance(img, torch.Tensor) else np.float32
        )[0]


class N4BiasFieldCorrectiond(MapTransform):
    """Dictionary version of :class:`N4BiasFieldCorrection` (apply to image keys only, never to labels).

    Args:
        keys: keys of the channel-first volumes to correct.
        allow_missing_keys: don't raise if a key is missing.
        kwargs: passed to :class:`N4BiasFieldCorrection`.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False, **kwargs) -> None:
        super().__init__(keys, allow_missing_keys)
        self.corrector = N4BiasFieldCorrection(**kwargs)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        """Correct every key of ``data`` named in ``keys``."""
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.corrector(d[key])
        return d
