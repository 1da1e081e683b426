"""Random 90-degree rotation in one plane whose class (0/90/180/270 degrees) is the pretext label.

This is the rotation pretext task of Swin UNETR self-supervised pretraining (Tang et al., CVPR 2022):
a view is rotated by ``k * 90`` degrees in one plane and the network predicts ``k``. After
``Orientationd("RAS")`` the spatial axes of a (C, R, A, S) sample run left→right, posterior→anterior and
inferior→superior; the default plane, spatial axes (1, 2), is spanned by A and S: the sagittal plane.
It is the plane of the original ``rot_rand`` (dims (2, 3) of a (C, R, A, S) sample).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.data.meta_obj import get_track_meta
from monai.transforms import MapTransform, RandomizableTransform, Rotate90
from monai.utils import convert_to_tensor

__all__ = ["DEFAULT_NUM_CLASSES", "SAGITTAL_AXES", "RandRotate90Class", "RandRotate90Classd", "rotate90"]

DEFAULT_NUM_CLASSES = 4
# Spatial axes (R, A, S) = (0, 1, 2) after RAS orientation: (1, 2) spans the sagittal (A-S) plane. These
# are dims (2, 3) of a (C, R, A, S) sample, the dims the original code (``rot_rand``) turns.
SAGITTAL_AXES = (1, 2)
MAX_CLASSES = 4


def rotate90(img: torch.Tensor, k: int, spatial_axes: Sequence[int] = SAGITTAL_AXES) -> torch.Tensor:
    """Rotate a channel-first volume by ``k * 90`` degrees in the plane of two spatial axes.

    MONAI's ``Rotate90`` does the work so that a ``MetaTensor`` keeps a consistent affine.

    Args:
        img: channel-first volume (C, R, A, S) (any number of spatial dims).
        k: number of quarter turns; negative turns the other way (``rotate90(rotate90(x, k), -k) == x``).
        spatial_axes: the two spatial axes (channel excluded) spanning the plane; default (A, S), sagittal.

    Returns:
        The rotated volume (C, ...); the two plane axes swap lengths for odd ``k``.
    """
    return Rotate90(k=k, spatial_axes=tuple(spatial_axes))(img)


def _check_args(num_classes: int, spatial_axes: Sequence[int]) -> tuple[int, int]:
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes must be in 1..{MAX_CLASSES}, got {num_classes}")
    axes = tuple(int(a) for a in spatial_axes)
    if len(axes) != 2 or axes[0] == axes[1]:
        raise ValueError(f"spatial_axes must be two different spatial axes, got {spatial_axes}")
    return axes


class RandRotate90Class(RandomizableTransform):
    """Rotate by a uniformly drawn class ``k`` in ``0..num_classes-1`` quarter turns and remember ``k``.

    Unlike MONAI's ``RandRotate90`` (which draws ``1..max_k`` behind a probability gate), every class
    including "no rotation" is equally likely and the drawn class is exposed as :attr:`label`, the
    target of the rotation-prediction head.

    Args:
        num_classes: number of rotation classes (1..4); 4 gives 0/90/180/270 degrees.
        spatial_axes: the two spatial axes spanning the rotation plane; default (A, S), the sagittal plane.

    Raises:
        ValueError: ``num_classes`` outside 1..4 or ``spatial_axes`` not two different axes.
    """

    backend = Rotate90.backend

    def __init__(
        self, num_classes: int = DEFAULT_NUM_CLASSES, spatial_axes: Sequence[int] = SAGITTAL_AXES
    ) -> None:
        RandomizableTransform.__init__(self, prob=1.0)
        self.spatial_axes = _check_args(num_classes, spatial_axes)
        self.num_classes = num_classes
        self._k = 0

    @property
    def label(self) -> int:
        """The class drawn by the last :meth:`randomize` (number of quarter turns)."""
        return self._k

    def randomize(self, data: object = None) -> None:
        """Draw the rotation class from ``self.R``."""
        super().randomize(None)
        self._k = int(self.R.randint(self.num_classes))

    def __call__(self, img: torch.Tensor, randomize: bool = True) -> torch.Tensor:
        """Rotate ``img`` (C, R, A, S) by the drawn class; read the class from :attr:`label`."""
        if randomize:
            self.randomize()
        img = convert_to_tensor(img, track_meta=get_track_meta())
        return rotate90(img, self._k, self.spatial_axes) if self._k else img


class RandRotate90Classd(RandomizableTransform, MapTransform):
    """Dictionary twin of :class:`RandRotate90Class`: one draw rotates all keys; ``label_key`` gets the class.

    Use one instance per view so that the views get independent rotations.

    Args:
        keys: keys of the channel-first volumes (C, R, A, S) to rotate together.
        label_key: key receiving the class as a 0-d ``torch.long`` tensor (collates to (B,)).
        num_classes: number of rotation classes (1..4).
        spatial_axes: the two spatial axes spanning the rotation plane; default (A, S), sagittal.
        allow_missing_keys: don't raise if a key is missing.
    """

    backend = RandRotate90Class.backend

    def __init__(
        self,
        keys: KeysCollection,
        label_key: str = "rot_label",
        num_classes: int = DEFAULT_NUM_CLASSES,
        spatial_axes: Sequence[int] = SAGITTAL_AXES,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob=1.0)
        self.rotate = RandRotate90Class(num_classes=num_classes, spatial_axes=spatial_axes)
        self.label_key = label_key

    def set_random_state(self, seed: int | None = None, state=None) -> RandRotate90Classd:
        """Seed this transform and its array twin."""
        super().set_random_state(seed, state)
        self.rotate.set_random_state(seed, state)
        return self

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        """Rotate every key by one drawn class and store the class under ``label_key``."""
        d = dict(data)
        self.rotate.randomize()
        for key in self.key_iterator(d):
            d[key] = self.rotate(d[key], randomize=False)
        d[self.label_key] = torch.tensor(self.rotate.label, dtype=torch.long)
        return d
