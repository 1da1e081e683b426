"""AFiRe's 3D Synthetic Lesion Mask (SLM): soft, textured ellipsoids added to an aligned volume.

See ``docs/methods.md`` (section "AFiRe-3D").

For a volume ``x`` in the [0, 1] intensity range, 1 to 4 lesions are drawn. Each is an ellipsoid
with per-axis extents drawn independently from a fraction of the side, centred on a random
foreground voxel; its texture is a cube cut from the *same* volume around another random
foreground voxel, trilinearly resized to the lesion's box, and multiplied by a soft ellipsoid
``exp(-sum_i ((u_i - c_i) / a_i)^2 / 0.5)`` min-max scaled to ``[0, s]``, ``s ~ U(0, 0.5)``.
The lesions add into the map ``m >= 0``; where ``m > 0`` the lesioned volume is
``clip(x + m, 0, 0.92)`` (hyperdense) or ``clip(x - m, 0, 0.92)`` (hypodense), and everywhere else it
is ``x`` unchanged (the clip never touches a voxel without lesion). A patch token is *abnormal* when
any voxel of its patch has ``m > 0``.

Shapes are written (C, D, H, W); after the preset's ``Orientationd("RAS")`` the spatial axes D, H, W
run left->right, posterior->anterior and inferior->superior (an (x, y, z) index order).

Everything but the loop over the (at most 4) lesions is tensor arithmetic; all randomness is
drawn from ``self.R``, so MONAI's ``set_determinism`` and ``set_random_state`` reproduce it.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import convert_to_tensor

__all__ = [
    "LesionOutput",
    "LesionParams",
    "RandSyntheticLesion",
    "RandSyntheticLesiond",
    "abnormal_tokens",
]

MIN_LESIONS = 1
MAX_LESIONS = 4
EXTENT_FRACTION = (0.07, 0.57)
"""Range of a lesion's full extent along an axis, as a fraction of that side (the semi-axis is half)."""
TEXTURE_FRACTION = 0.27
"""Side of the texture cube, as a fraction of the volume's side."""
SOFTNESS = 0.5
"""Denominator of the soft ellipsoid's exponent."""
MAX_STRENGTH = 0.5
"""The soft ellipsoid is scaled to ``[0, s]`` with ``s ~ U(0, MAX_STRENGTH)``."""
CLIP_RANGE = (0.0, 0.92)
FOREGROUND_THRESHOLD = 0.0
"""Voxels above this (in [0, 1] intensities) are foreground; lesions and textures are centred on them."""
PATCH_SIZE = 16
SIGNS = {"hyperdense": 1.0, "hypodense": -1.0}
LESIONED_POSTFIX = "_lesioned"
MAP_POSTFIX = "_lesion_map"
ABNORMAL_POSTFIX = "_abnormal"


class LesionOutput(NamedTuple):
    """What :class:`RandSyntheticLesion` returns.

    Attributes:
        lesioned: ``x~``, (C, D, H, W).
        lesion_map: the additive map ``m >= 0``, (C, D, H, W).
        abnormal: (N,) bool, one per patch (raster order over the patch grid, last axis fastest): any
            voxel of the patch has ``m > 0``.
    """

    lesioned: torch.Tensor
    lesion_map: torch.Tensor
    abnormal: torch.Tensor


@dataclass(frozen=True)
class LesionParams:
    """One lesion's random draw, in voxels of the volume it was drawn for.

    Attributes:
        centre: lesion centre, a voxel index (D, H, W).
        extent: full extent of the lesion's box per axis (>= 1); semi-axes are half of it.
        texture_start: first voxel of the texture cube per axis.
        texture_size: side of the texture cube per axis.
        strength: ``s``, the maximum of the scaled soft ellipsoid.
    """

    centre: tuple[int, int, int]
    extent: tuple[int, int, int]
    texture_start: tuple[int, int, int]
    texture_size: tuple[int, int, int]
    strength: float


def abnormal_tokens(lesion_map: torch.Tensor, patch_size: int = PATCH_SIZE) -> torch.Tensor:
    """Which patches of a lesion map hold any ``m > 0``.

    Args:
        lesion_map: (C, D, H, W) or (B, C, D, H, W); every spatial side divisible by ``patch_size``.
        patch_size: patch side (the ViT's).

    Returns:
        (N,) or (B, N) bool in raster order over the patch grid, last axis fastest (MONAI's ViT token
        order), N = prod(side / patch_size).

    Raises:
        ValueError: a side is not divisible by ``patch_size``.
    """
    spatial = lesion_map.shape[-3:]
    if any(s % patch_size for s in spatial):
        raise ValueError(f"spatial shape {tuple(spatial)} must be divisible by patch_size {patch_size}")
    lead = lesion_map.shape[:-4]
    g = [s // patch_size for s in spatial]
    hit = (lesion_map > 0).any(dim=-4)
    hit = hit.reshape(*lead, g[0], patch_size, g[1], patch_size, g[2], patch_size)
    n = len(lead)
    return hit.any(dim=n + 5).any(dim=n + 3).any(dim=n + 1).reshape(*lead, -1)


def _soft_ellipsoid(extent: Sequence[int], device: torch.device) -> torch.Tensor:
    """``exp(-sum_i ((u_i - c_i) / a_i)^2 / SOFTNESS)`` on the lesion's box, min-max scaled to [0, 1]."""
    axes = []
    for e in extent:
        u = torch.arange(e, dtype=torch.float32, device=device) + 0.5  # voxel centres
        axes.append(((u - e / 2) / (e / 2)) ** 2)
    r2 = axes[0][:, None, None] + axes[1][None, :, None] + axes[2][None, None, :]
    g = torch.exp(-r2 / SOFTNESS)
    span = g.max() - g.min()
    return (g - g.min()) / span if span > 0 else torch.ones_like(g)


class RandSyntheticLesion(RandomizableTransform):
    """Add 1-4 textured soft-ellipsoid lesions to a volume (AFiRe's SLM in 3D).

    Args:
        prob: probability of adding lesions at all (otherwise ``m = 0``).
        num_lesions: inclusive (min, max) lesion count.
        extent_fraction: (low, high) of a lesion's full extent per axis, as a fraction of the side.
        texture_fraction: texture cube side as a fraction of the volume's side.
        max_strength: ``s ~ U(0, max_strength)``.
        polarity: ``"hyperdense"`` (add ``m``, the default) or ``"hypodense"`` (subtract it).
        clip_range: lesion voxels (``m > 0``) are clipped to this range; other voxels are left as they are.
        foreground_threshold: voxels above it are foreground (lesion centres, texture centres);
            a volume without foreground uses every voxel.
        patch_size: patch side of the abnormal-token mask.

    Raises:
        ValueError: for a bad count, fraction, strength, polarity or range.
    """

    def __init__(
        self,
        prob: float = 1.0,
        num_lesions: tuple[int, int] = (MIN_LESIONS, MAX_LESIONS),
        extent_fraction: tuple[float, float] = EXTENT_FRACTION,
        texture_fraction: float = TEXTURE_FRACTION,
        max_strength: float = MAX_STRENGTH,
        polarity: str = "hyperdense",
        clip_range: tuple[float, float] = CLIP_RANGE,
        foreground_threshold: float = FOREGROUND_THRESHOLD,
        patch_size: int = PATCH_SIZE,
    ) -> None:
        RandomizableTransform.__init__(self, prob)
        lo, hi = (int(n) for n in num_lesions)
        if not 1 <= lo <= hi:
            raise ValueError(f"num_lesions must be (min, max) with 1 <= min <= max, got {num_lesions}")
        f_lo, f_hi = (float(f) for f in extent_fraction)
        if not 0 < f_lo <= f_hi <= 1:
            raise ValueError(f"extent_fraction must satisfy 0 < low <= high <= 1, got {extent_fraction}")
        if not 0 < texture_fraction <= 1:
            raise ValueError(f"texture_fraction must be in (0, 1], got {texture_fraction}")
        if max_strength < 0:
            raise ValueError(f"max_strength must be >= 0, got {max_strength}")
        if polarity not in SIGNS:
            raise ValueError(f"polarity must be one of {sorted(SIGNS)}, got {polarity!r}")
        if not clip_range[0] < clip_range[1]:
            raise ValueError(f"clip_range must be (low, high) with low < high, got {clip_range}")
        if patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}")
        self.num_lesions = (lo, hi)
        self.extent_fraction = (f_lo, f_hi)
        self.texture_fraction = float(texture_fraction)
        self.max_strength = float(max_strength)
        self.polarity = polarity
        self.clip_range = (float(clip_range[0]), float(clip_range[1]))
        self.foreground_threshold = float(foreground_threshold)
        self.patch_size = int(patch_size)
        self.lesions: list[LesionParams] = []

    def _random_foreground_voxel(self, flat_fg: np.ndarray, shape: Sequence[int]) -> np.ndarray:
        return np.array(np.unravel_index(flat_fg[self.R.randint(len(flat_fg))], shape))

    def randomize(self, img: torch.Tensor | np.ndarray) -> None:
        """Draw the lesions for ``img`` (C, D, H, W); the first channel decides the foreground."""
        super().randomize(None)
        self.lesions = []
        if not self._do_transform:
            return
        first = convert_to_tensor(img, track_meta=False)[0]
        shape = tuple(first.shape)
        flat_fg = torch.nonzero(first.reshape(-1) > self.foreground_threshold).reshape(-1).cpu().numpy()
        if flat_fg.size == 0:
            flat_fg = np.arange(first.numel())
        sides = np.array(shape)
        tex_size = np.clip(np.rint(self.texture_fraction * sides), 1, sides).astype(int)
        count = self.R.randint(self.num_lesions[0], self.num_lesions[1] + 1)
        for _ in range(count):
            extent = np.maximum(np.rint(self.R.uniform(*self.extent_fraction, size=3) * sides), 1).astype(int)
            centre = self._random_foreground_voxel(flat_fg, shape)
            tex_centre = self._random_foreground_voxel(flat_fg, shape)
            tex_start = np.clip(tex_centre - tex_size // 2, 0, sides - tex_size)
            self.lesions.append(
                LesionParams(
                    centre=tuple(int(v) for v in centre),
                    extent=tuple(int(v) for v in extent),
                    texture_start=tuple(int(v) for v in tex_start),
                    texture_size=tuple(int(v) for v in tex_size),
                    strength=float(self.R.uniform(0.0, self.max_strength)),
                )
            )

    def lesion_map(self, img: torch.Tensor) -> torch.Tensor:
        """The additive map ``m`` (C, D, H, W) of the drawn lesions for ``img`` (C, D, H, W)."""
        m = torch.zeros_like(img, dtype=torch.float32)
        sides = img.shape[1:]
        for les in self.lesions:
            t0, ts = les.texture_start, les.texture_size
            cube = img[:, t0[0] : t0[0] + ts[0], t0[1] : t0[1] + ts[1], t0[2] : t0[2] + ts[2]].float()
            texture = F.interpolate(cube[None], size=les.extent, mode="trilinear", align_corners=False)[0]
            blob = texture.clamp_min(0.0) * (les.strength * _soft_ellipsoid(les.extent, img.device))
            # The box may stick out of the volume: add only its overlap (nothing wraps).
            lo = [c - e // 2 for c, e in zip(les.centre, les.extent, strict=True)]
            dst = tuple(slice(max(a, 0), min(a + e, s)) for a, e, s in zip(lo, les.extent, sides, strict=True))
            src = tuple(slice(d.start - a, d.stop - a) for d, a in zip(dst, lo, strict=True))
            m[(slice(None), *dst)] += blob[(slice(None), *src)]
        return m

    def __call__(self, img: torch.Tensor | np.ndarray, randomize: bool = True) -> LesionOutput:
        """Add lesions to ``img``.

        Args:
            img: (C, D, H, W) intensities in [0, 1]; sides divisible by ``patch_size``.
            randomize: draw new lesions (False reuses the last draw, e.g. for a second key).

        Returns:
            :class:`LesionOutput` (lesioned volume, map ``m``, abnormal-token mask).

        Raises:
            ValueError: ``img`` is not 4D or a side is not divisible by ``patch_size``.
        """
        x = convert_to_tensor(img, track_meta=False, dtype=torch.float32)
        if x.ndim != 4:
            raise ValueError(f"RandSyntheticLesion expects (C, D, H, W), got shape {tuple(x.shape)}")
        if randomize:
            self.randomize(x)
        m = self.lesion_map(x)
        # Clip only lesion voxels: a bright normal voxel (bone, contrast) stays what the teacher sees.
        lesioned = torch.where(m > 0, (x + SIGNS[self.polarity] * m).clamp(*self.clip_range), x)
        return LesionOutput(lesioned, m, abnormal_tokens(m, self.patch_size))


class RandSyntheticLesiond(RandomizableTransform, MapTransform):
    """Dict twin of :class:`RandSyntheticLesion`: one draw (on the first key), applied to every key.

    For each key ``k`` the clean volume stays under ``k`` (the restoration target) and the
    transform adds ``k + lesioned_postfix`` (the student's input ``x~``), ``k + map_postfix``
    (``m``) and ``k + abnormal_postfix`` ((N,) bool token mask).

    Args:
        keys: keys of (C, D, H, W) volumes in [0, 1].
        lesioned_postfix: suffix of the lesioned volume's key.
        map_postfix: suffix of the lesion map's key.
        abnormal_postfix: suffix of the abnormal-token mask's key.
        allow_missing_keys: skip absent keys.
        **kwargs: :class:`RandSyntheticLesion` arguments (``prob``, ``polarity``, ...).
    """

    backend = [torch.Tensor]

    def __init__(
        self,
        keys: KeysCollection,
        lesioned_postfix: str = LESIONED_POSTFIX,
        map_postfix: str = MAP_POSTFIX,
        abnormal_postfix: str = ABNORMAL_POSTFIX,
        allow_missing_keys: bool = False,
        **kwargs,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.lesion = RandSyntheticLesion(**kwargs)
        RandomizableTransform.__init__(self, self.lesion.prob)
        self.lesioned_postfix = lesioned_postfix
        self.map_postfix = map_postfix
        self.abnormal_postfix = abnormal_postfix

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        """Seed this transform and its array transform."""
        super().set_random_state(seed, state)
        self.lesion.set_random_state(seed, state)
        return self

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        """Add the lesioned volume, the map and the token mask of every key."""
        d = dict(data)
        first = self.first_key(d)
        if first == ():
            return d
        self.lesion.randomize(d[first])
        for key in self.key_iterator(d):
            out = self.lesion(d[key], randomize=False)
            d[f"{key}{self.lesioned_postfix}"] = out.lesioned
            d[f"{key}{self.map_postfix}"] = out.lesion_map
            d[f"{key}{self.abnormal_postfix}"] = out.abnormal
        return d
