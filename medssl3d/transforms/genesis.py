"""The 3D Models-Genesis distortions (Zhou et al., MedIA 2021) as MONAI random transforms.

A distorted copy of a volume is restored by the network (DiRA's restorative branch, ``docs/methods.md``,
section "DiRA-3D"):

- :class:`RandBezierIntensity`: non-linear intensity remap by a random monotone cubic Bézier curve;
- :class:`RandLocalShuffle`: voxels shuffled inside small cubes;
- :class:`RandInPaint`: random inner boxes filled with uniform noise;
- :class:`RandOutPaint`: uniform noise everywhere except inside random inner boxes.

Each has a dict twin (``...d``) that draws once and applies the same distortion to every key; the
keys are distorted in place, so the undistorted target must live under another key (copy it
first; the mixes below do not touch any other key). Intensities are expected in [0, 1] (the
presets' range). Every draw goes through ``self.R``; the work is vectorised (a loop runs only
over the handful of painted boxes, each rasterised at once). Volumes are (C, X, Y, Z): after the
presets' ``Orientationd("RAS")`` the three spatial axes run left→right, posterior→anterior and
inferior→superior; none of these distortions depends on the direction of an axis.

Two mixes, named in :data:`DISTORTIONS`:

- ``"genesis"`` (:func:`genesis_distortions`, the default of ``docs/methods.md``): the Models-Genesis
  chain, Bézier remap, then local shuffling, then in- or out-painting, each drawn on its own;
- ``"exclusive"`` (:func:`exclusive_distortions`, official DiRA's mix): exactly one of in-painting,
  out-painting, local shuffling or nothing, and no intensity remap.

Differences from the original code, all deliberate: the Bézier curve is made monotone (sorted
control points) as docs/methods.md (DiRA-3D) describes, the original's "flip" (a decreasing curve) kept with
probability ``invert_prob``; shuffling uses one random, non-overlapping grid of cubes per call
instead of 10 000 overlapping blocks, so each cube's voxel multiset is preserved; painting always
draws at least one box.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import Compose, MapTransform, OneOf, RandomizableTransform
from monai.transforms.utility.dictionary import Identityd
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_tensor

__all__ = [
    "DEFAULT_BEZIER_PROB",
    "DEFAULT_INPAINT_RATE",
    "DEFAULT_PAINT_PROB",
    "DEFAULT_SHUFFLE_PROB",
    "RandBezierIntensity",
    "RandBezierIntensityd",
    "RandInPaint",
    "RandInPaintd",
    "RandLocalShuffle",
    "RandLocalShuffled",
    "RandOutPaint",
    "RandOutPaintd",
    "DISTORTIONS",
    "bezier_lookup",
    "distortions",
    "exclusive_distortions",
    "genesis_distortions",
]

# Probabilities of the "genesis" mix (Models Genesis' nonlinear_rate, local_rate, paint_rate, inpaint_rate).
DEFAULT_BEZIER_PROB = 0.9
DEFAULT_SHUFFLE_PROB = 0.5
DEFAULT_PAINT_PROB = 0.9
DEFAULT_INPAINT_RATE = 0.2  # in-painting with 0.9 * 0.2, out-painting with 0.9 * 0.8
# Probabilities of the "exclusive" mix (official DiRA's Custom_Distoration); nothing with the rest, 0.35.
DEFAULT_EXCLUSIVE_INPAINT_PROB = 0.30
DEFAULT_EXCLUSIVE_OUTPAINT_PROB = 0.05
DEFAULT_EXCLUSIVE_SHUFFLE_PROB = 0.30
DEFAULT_INVERT_PROB = 0.5  # Models Genesis flips the curve half of the time ("Half change to get flip")
DEFAULT_CURVE_SAMPLES = 1000  # the curve is sampled here and interpolated piecewise-linearly
# Cube sides are drawn in [1, max(1, floor(0.1 * side))] voxels per axis, as the original's blocks.
DEFAULT_MAX_CUBE = 0.1
# Share of grid cubes shuffled: the original's 10 000 overlapping blocks reach about 85 % of a
# 64 x 64 x 32 crop.
DEFAULT_SHUFFLE_FRACTION = 0.85
DEFAULT_MAX_BOXES = 5  # in-painting draws up to 5 boxes, out-painting keeps up to 5
DEFAULT_CONTINUE_PROB = 0.95  # chance of drawing each further box
DEFAULT_MARGIN = 3  # voxels between a box and the border
DEFAULT_INPAINT_SIZE = (1 / 6, 1 / 3)  # in-painted box side, fraction of the axis
DEFAULT_OUTPAINT_KEEP = (3 / 7, 4 / 7)  # out-painting keeps boxes of side (1 - U(3/7, 4/7)) * axis
CUBIC_DEGREE = 3


def bezier_lookup(inner_x: Sequence[float], inner_y: Sequence[float], n_samples: int = DEFAULT_CURVE_SAMPLES,
                  invert: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Samples of the cubic Bézier curve through (0, 0), (x1, y1), (x2, y2), (1, 1).

    With ``x1 <= x2`` and ``y1 <= y2`` in [0, 1] both coordinates are non-decreasing in the curve
    parameter (the derivative of a cubic Bernstein polynomial is a quadratic one with the
    coefficient differences, all >= 0), so the curve is the graph of a non-decreasing map of
    [0, 1] onto [0, 1].

    Args:
        inner_x: the two inner control points' x, sorted ascending, in [0, 1].
        inner_y: their y, sorted ascending, in [0, 1].
        n_samples: points sampled along the curve.
        invert: reverse the y samples: a non-increasing map with 0 -> 1 and 1 -> 0.

    Returns:
        ``(xs, ys)``, each ``(n_samples,)`` float64, ``xs`` non-decreasing from 0 to 1.
    """
    t = np.linspace(0.0, 1.0, n_samples)[:, None]
    i = np.arange(CUBIC_DEGREE + 1)[None]
    binom = np.array([1.0, 3.0, 3.0, 1.0])
    basis = binom * t**i * (1.0 - t) ** (CUBIC_DEGREE - i)  # (n, 4) Bernstein polynomials
    xs = basis @ np.array([0.0, *inner_x, 1.0])
    ys = basis @ np.array([0.0, *inner_y, 1.0])
    return xs, (ys[::-1].copy() if invert else ys)


def _interp(values: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear ``np.interp`` in torch (values clamped to [xs[0], xs[-1]])."""
    v = values.clamp(float(xs[0]), float(xs[-1]))
    idx = torch.searchsorted(xs, v.reshape(-1).contiguous()).clamp(1, xs.numel() - 1).reshape(v.shape)
    x0, x1, y0, y1 = xs[idx - 1], xs[idx], ys[idx - 1], ys[idx]
    w = ((v - x0) / (x1 - x0).clamp_min(torch.finfo(xs.dtype).tiny)).clamp(0.0, 1.0)
    return y0 + w * (y1 - y0)


class RandBezierIntensity(RandomizableTransform):
    """Remap intensities by a random monotone cubic Bézier curve (Models Genesis' non-linear transform).

    The two inner control points are uniform in [0, 1]², their x and y sorted, so the map is
    monotone and takes [0, 1] into [0, 1]; with probability ``invert_prob`` it is decreasing.
    Intensities outside [0, 1] are clamped first. After a call, :attr:`curve` holds the samples ``(xs, ys)``.

    Args:
        prob: probability of remapping.
        invert_prob: probability that the curve decreases (Models Genesis' "flip").
        n_samples: samples of the curve for the piecewise-linear lookup.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, prob: float = DEFAULT_BEZIER_PROB, invert_prob: float = DEFAULT_INVERT_PROB,
                 n_samples: int = DEFAULT_CURVE_SAMPLES) -> None:
        RandomizableTransform.__init__(self, prob)
        if not 0.0 <= invert_prob <= 1.0:
            raise ValueError(f"invert_prob must be in [0, 1], got {invert_prob}")
        if n_samples < 2:
            raise ValueError(f"n_samples must be >= 2, got {n_samples}")
        self.invert_prob = invert_prob
        self.n_samples = n_samples
        self.curve: tuple[np.ndarray, np.ndarray] | None = None

    def randomize(self, data=None) -> None:
        """Draw whether to remap and, if so, the curve."""
        super().randomize(None)
        if not self._do_transform:
            return
        inner = np.sort(self.R.uniform(0.0, 1.0, size=(2, 2)), axis=1)  # rows: x, y
        invert = self.R.uniform() < self.invert_prob
        self.curve = bezier_lookup(inner[0], inner[1], self.n_samples, invert=bool(invert))

    def __call__(self, img, randomize: bool = True):
        """Return the remapped copy of ``img`` (C, X, Y, Z) (or ``img`` unchanged when not drawn)."""
        if randomize:
            self.randomize()
        if not self._do_transform:
            return img
        if self.curve is None:
            raise RuntimeError("call randomize() before applying RandBezierIntensity with randomize=False")
        t = convert_to_tensor(img, track_meta=False)
        xs, ys = (torch.as_tensor(a, dtype=torch.float64, device=t.device) for a in self.curve)
        return convert_to_dst_type(_interp(t.double(), xs, ys).to(t.dtype), img)[0]


class RandLocalShuffle(RandomizableTransform):
    """Shuffle voxels inside small cubes (Models Genesis' local pixel shuffling), vectorised.

    One cube size is drawn per call (each side uniform in [1, max(1, floor(max_cube * side))]
    voxels) and the volume is tiled by a grid of such cubes at a random offset; a random
    ``shuffle_fraction`` of the cubes each get an independent random permutation of their voxels,
    the same permutation for every channel. Cubes never overlap, so every shuffled cube keeps
    its multiset of values. After a call, :attr:`cube` is the cube size, :attr:`offset` the grid
    offset and :attr:`selected` a bool array over the grid of cubes (cubes along each spatial axis,
    in the volume's axis order) marking the shuffled ones.

    Args:
        prob: probability of shuffling.
        max_cube: largest cube side as a fraction of the axis length.
        shuffle_fraction: expected share of the grid's cubes that are shuffled.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, prob: float = DEFAULT_SHUFFLE_PROB, max_cube: float = DEFAULT_MAX_CUBE,
                 shuffle_fraction: float = DEFAULT_SHUFFLE_FRACTION) -> None:
        RandomizableTransform.__init__(self, prob)
        if not 0.0 < max_cube <= 1.0:
            raise ValueError(f"max_cube must be in (0, 1], got {max_cube}")
        if not 0.0 <= shuffle_fraction <= 1.0:
            raise ValueError(f"shuffle_fraction must be in [0, 1], got {shuffle_fraction}")
        self.max_cube = max_cube
        self.shuffle_fraction = shuffle_fraction
        self.cube: tuple[int, ...] = ()
        self.offset: tuple[int, ...] = ()
        self.selected: np.ndarray | None = None
        self._perm: np.ndarray | None = None

    def randomize(self, spatial_shape: Sequence[int]) -> None:
        """Draw the cube size, grid offset, shuffled cubes and their permutations for ``spatial_shape``."""
        super().randomize(None)
        if not self._do_transform:
            return
        sizes = np.asarray(spatial_shape)
        largest = np.maximum(1, np.floor(self.max_cube * sizes)).astype(np.int64)
        cube = self.R.randint(1, largest + 1)
        offset = self.R.randint(0, cube)
        grid = np.maximum((sizes - offset) // cube, 0)
        self.cube, self.offset = tuple(int(c) for c in cube), tuple(int(o) for o in offset)
        self.selected = self.R.uniform(size=tuple(int(g) for g in grid)) < self.shuffle_fraction
        n_sel, n_vox = int(self.selected.sum()), int(np.prod(cube))
        # argsort of uniform keys: an independent uniform permutation per row, without a Python loop
        self._perm = np.argsort(self.R.uniform(size=(n_sel, n_vox)), axis=1)

    def __call__(self, img, randomize: bool = True):
        """Return a shuffled copy of ``img`` (C, X, Y, Z) (or ``img`` unchanged when not drawn)."""
        if randomize:
            self.randomize(img.shape[1:])
        if not self._do_transform:
            return img
        if self.selected is None or self._perm is None:
            raise RuntimeError("call randomize() before applying RandLocalShuffle with randomize=False")
        t = convert_to_tensor(img, track_meta=False)
        out = t.clone()
        if self._perm.shape[0] == 0:
            return convert_to_dst_type(out, img)[0]
        grid, cube, ndim = self.selected.shape, self.cube, len(self.cube)
        region = tuple(slice(o, o + g * c) for o, g, c in zip(self.offset, grid, cube, strict=True))
        block = out[(slice(None), *region)]
        # (C, g0, c0, g1, c1, g2, c2) -> (C, g0, g1, g2, c0 * c1 * c2): one row of voxels per cube
        shape = [t.shape[0]] + [v for g, c in zip(grid, cube, strict=True) for v in (g, c)]
        order = [0] + [1 + 2 * a for a in range(ndim)] + [2 + 2 * a for a in range(ndim)]
        cubes = block.reshape(shape).permute(order).reshape(t.shape[0], *grid, -1)
        sel = torch.as_tensor(self.selected, device=t.device)
        perm = torch.as_tensor(self._perm, device=t.device)
        rows = cubes[:, sel]  # (C, n_sel, cube voxels)
        cubes[:, sel] = torch.gather(rows, 2, perm[None].expand_as(rows))
        inverse = np.argsort(order)
        back = cubes.reshape(t.shape[0], *grid, *cube).permute(*inverse.tolist()).reshape(block.shape)
        # A one-voxel-thick cube makes `back` a view of `out` itself: copy before writing it back.
        out[(slice(None), *region)] = back.clone()
        return convert_to_dst_type(out, img)[0]


class _RandPaint(RandomizableTransform):
    """Shared box drawing of in- and out-painting: 1..max_boxes boxes, noise from ``self.R``."""

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, prob: float, size_range: tuple[float, float], max_boxes: int, continue_prob: float,
                 margin: int) -> None:
        RandomizableTransform.__init__(self, prob)
        lo, hi = size_range
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"box size range must satisfy 0 < low <= high <= 1, got {size_range}")
        if max_boxes < 1:
            raise ValueError(f"max_boxes must be >= 1, got {max_boxes}")
        if not 0.0 <= continue_prob <= 1.0:
            raise ValueError(f"continue_prob must be in [0, 1], got {continue_prob}")
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.size_range = (lo, hi)
        self.max_boxes = max_boxes
        self.continue_prob = continue_prob
        self.margin = margin
        self.boxes: np.ndarray | None = None
        self.mask: np.ndarray | None = None
        self._noise: np.ndarray | None = None

    def _box_sides(self, sizes: np.ndarray, n: int) -> np.ndarray:
        lo, hi = self.size_range
        frac = self.R.uniform(lo, hi, size=(n, sizes.size))
        return np.clip(np.round(frac * sizes), 1, sizes).astype(np.int64)

    def randomize(self, shape: Sequence[int]) -> None:
        """Draw the boxes and the noise for a volume of ``shape`` (C, X, Y, Z)."""
        super().randomize(None)
        if not self._do_transform:
            return
        sizes = np.asarray(shape[1:])
        # The first box always; each further one while a U(0, 1) draw stays below continue_prob.
        more = self.R.uniform(size=self.max_boxes - 1) < self.continue_prob
        n = 1 + int(np.cumprod(more).sum())
        sides = self._box_sides(sizes, n)
        room = sizes - sides - 2 * self.margin  # start in [margin, size - side - margin] when it fits
        lo = np.where(room >= 0, self.margin, 0)
        hi = np.where(room >= 0, sizes - sides - self.margin, sizes - sides)
        starts = np.floor(self.R.uniform(size=sides.shape) * (hi - lo + 1)).astype(np.int64) + lo
        self.boxes = np.stack([starts, starts + sides], axis=-1)  # (n, ndim, 2) start / stop
        mask = np.zeros(tuple(sizes), dtype=bool)
        grids = np.ogrid[tuple(slice(0, s) for s in sizes)]
        for box in self.boxes:  # at most max_boxes, each rasterised by broadcasting
            inside = [(g >= b[0]) & (g < b[1]) for g, b in zip(grids, box, strict=True)]
            mask |= np.logical_and.reduce(np.broadcast_arrays(*inside))
        self.mask = mask
        self._noise = self.R.uniform(size=tuple(shape)).astype(np.float32)

    def _paint(self, img, where_noise: np.ndarray):
        t = convert_to_tensor(img, track_meta=False)
        noise = torch.as_tensor(self._noise, device=t.device, dtype=t.dtype)
        where = torch.as_tensor(where_noise, device=t.device)[None]
        return convert_to_dst_type(torch.where(where, noise, t), img)[0]

    def _check(self, img) -> None:
        if self.mask is None or self._noise is None:
            raise RuntimeError(f"call randomize() before applying {type(self).__name__} with randomize=False")
        if tuple(self._noise.shape) != tuple(img.shape):
            raise ValueError(f"image shape {tuple(img.shape)} does not match the drawn {self._noise.shape}")


class RandInPaint(_RandPaint):
    """Fill random inner boxes with uniform noise in [0, 1] (Models Genesis' in-painting).

    Draws 1 to ``max_boxes`` boxes (each further one with probability ``continue_prob``), sides
    in ``size_range`` of each axis, ``margin`` voxels from the border where they fit. Only voxels
    inside the boxes change. After a call, :attr:`mask` (the spatial shape) marks the filled voxels and
    :attr:`boxes` holds them as ``(n, ndim, 2)`` start / stop indices.

    Args:
        prob: probability of in-painting.
        size_range: box side as a fraction of the axis, (low, high).
        max_boxes: most boxes drawn.
        continue_prob: probability of drawing each box after the first.
        margin: voxels kept between a box and the border.
    """

    def __init__(self, prob: float = 1.0, size_range: tuple[float, float] = DEFAULT_INPAINT_SIZE,
                 max_boxes: int = DEFAULT_MAX_BOXES, continue_prob: float = DEFAULT_CONTINUE_PROB,
                 margin: int = DEFAULT_MARGIN) -> None:
        super().__init__(prob, tuple(size_range), max_boxes, continue_prob, margin)

    def __call__(self, img, randomize: bool = True):
        """Return an in-painted copy of ``img`` (C, X, Y, Z) (or ``img`` unchanged when not drawn)."""
        if randomize:
            self.randomize(img.shape)
        if not self._do_transform:
            return img
        self._check(img)
        return self._paint(img, self.mask)


class RandOutPaint(_RandPaint):
    """Keep random inner boxes and fill everything else with uniform noise (Models Genesis' out-painting).

    Box sides are ``(1 - U(keep_range)) * side`` per axis, as the original; otherwise as
    :class:`RandInPaint`. Only voxels outside the boxes change; :attr:`mask` marks the kept voxels.

    Args:
        prob: probability of out-painting.
        keep_range: (low, high) of the drawn fraction subtracted from each side.
        max_boxes: most boxes kept.
        continue_prob: probability of drawing each box after the first.
        margin: voxels between a box and the border.
    """

    def __init__(self, prob: float = 1.0, keep_range: tuple[float, float] = DEFAULT_OUTPAINT_KEEP,
                 max_boxes: int = DEFAULT_MAX_BOXES, continue_prob: float = DEFAULT_CONTINUE_PROB,
                 margin: int = DEFAULT_MARGIN) -> None:
        lo, hi = keep_range
        super().__init__(prob, (1.0 - hi, 1.0 - lo), max_boxes, continue_prob, margin)

    def __call__(self, img, randomize: bool = True):
        """Return an out-painted copy of ``img`` (C, X, Y, Z) (or ``img`` unchanged when not drawn)."""
        if randomize:
            self.randomize(img.shape)
        if not self._do_transform:
            return img
        self._check(img)
        return self._paint(img, ~self.mask)


class _Distortiond(RandomizableTransform, MapTransform):
    """Dict twin: one draw (from the first key's shape), the same distortion on every key, in place."""

    def __init__(self, keys: KeysCollection, transform: RandomizableTransform, allow_missing_keys: bool) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob=1.0)
        self.transform = transform

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        """Seed this transform and its array twin."""
        super().set_random_state(seed, state)
        self.transform.set_random_state(seed, state)
        return self

    def _randomize_for(self, img) -> None:
        raise NotImplementedError

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        """Distort every key with one draw; other keys (the targets) are left as they are."""
        d = dict(data)
        first = self.first_key(d)
        if first == ():
            return d
        self._randomize_for(d[first])
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key], randomize=False)
        return d


class RandBezierIntensityd(_Distortiond):
    """Dict twin of :class:`RandBezierIntensity` (one curve for every key).

    Args:
        keys: keys of the (C, X, Y, Z) volumes to remap in place.
        allow_missing_keys: don't raise if a key is missing.
        **kwargs: :class:`RandBezierIntensity` arguments.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False, **kwargs) -> None:
        super().__init__(keys, RandBezierIntensity(**kwargs), allow_missing_keys)

    def _randomize_for(self, img) -> None:
        self.transform.randomize()


class RandLocalShuffled(_Distortiond):
    """Dict twin of :class:`RandLocalShuffle` (the same cubes and permutations for every key).

    Args:
        keys: keys of the (C, X, Y, Z) volumes to shuffle in place (one spatial shape).
        allow_missing_keys: don't raise if a key is missing.
        **kwargs: :class:`RandLocalShuffle` arguments.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False, **kwargs) -> None:
        super().__init__(keys, RandLocalShuffle(**kwargs), allow_missing_keys)

    def _randomize_for(self, img) -> None:
        self.transform.randomize(img.shape[1:])


class RandInPaintd(_Distortiond):
    """Dict twin of :class:`RandInPaint` (the same boxes and noise for every key).

    Args:
        keys: keys of the (C, X, Y, Z) volumes to paint in place (one shape).
        allow_missing_keys: don't raise if a key is missing.
        **kwargs: :class:`RandInPaint` arguments.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False, **kwargs) -> None:
        super().__init__(keys, RandInPaint(**kwargs), allow_missing_keys)

    def _randomize_for(self, img) -> None:
        self.transform.randomize(img.shape)


class RandOutPaintd(_Distortiond):
    """Dict twin of :class:`RandOutPaint` (the same boxes and noise for every key).

    Args:
        keys: keys of the (C, X, Y, Z) volumes to paint in place (one shape).
        allow_missing_keys: don't raise if a key is missing.
        **kwargs: :class:`RandOutPaint` arguments.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False, **kwargs) -> None:
        super().__init__(keys, RandOutPaint(**kwargs), allow_missing_keys)

    def _randomize_for(self, img) -> None:
        self.transform.randomize(img.shape)


def _check_probabilities(**probs: float) -> None:
    for name, p in probs.items():
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {p}")


def genesis_distortions(
    keys: KeysCollection,
    *,
    bezier_prob: float = DEFAULT_BEZIER_PROB,
    shuffle_prob: float = DEFAULT_SHUFFLE_PROB,
    paint_prob: float = DEFAULT_PAINT_PROB,
    inpaint_rate: float = DEFAULT_INPAINT_RATE,
) -> Compose:
    """The Models-Genesis chain on ``keys``, in place (the default of ``docs/methods.md``, section "DiRA-3D").

    Bézier remap (``bezier_prob``), local shuffling (``shuffle_prob``), then either in-painting
    (probability ``paint_prob * inpaint_rate``) or out-painting (``paint_prob * (1 - inpaint_rate)``),
    never both (a MONAI ``OneOf`` whose choice is drawn from its ``self.R``).

    Raises:
        ValueError: a probability outside [0, 1].
    """
    _check_probabilities(bezier_prob=bezier_prob, shuffle_prob=shuffle_prob, paint_prob=paint_prob,
                         inpaint_rate=inpaint_rate)
    paint = OneOf(
        [RandInPaintd(keys), RandOutPaintd(keys), Identityd(keys)],
        weights=[paint_prob * inpaint_rate, paint_prob * (1.0 - inpaint_rate), 1.0 - paint_prob],
    )
    return Compose([RandBezierIntensityd(keys, prob=bezier_prob), RandLocalShuffled(keys, prob=shuffle_prob), paint])


def exclusive_distortions(
    keys: KeysCollection,
    *,
    inpaint_prob: float = DEFAULT_EXCLUSIVE_INPAINT_PROB,
    outpaint_prob: float = DEFAULT_EXCLUSIVE_OUTPAINT_PROB,
    shuffle_prob: float = DEFAULT_EXCLUSIVE_SHUFFLE_PROB,
) -> OneOf:
    """Official DiRA's mix on ``keys``, in place: exactly one of in-painting, out-painting, shuffling or nothing.

    Each call draws one branch (a MONAI ``OneOf`` drawn from its ``self.R``): in-painting with
    ``inpaint_prob``, out-painting with ``outpaint_prob``, local shuffling with ``shuffle_prob``,
    and no distortion with the rest (0.35 by default). There is no intensity remap. The branches
    are this module's 3D transforms with their Models-Genesis box sizes and uniform-noise fill,
    not the 2D original's zero-filled cut-outs and swapped blocks.

    Raises:
        ValueError: a probability outside [0, 1], or probabilities summing to more than 1.
    """
    _check_probabilities(inpaint_prob=inpaint_prob, outpaint_prob=outpaint_prob, shuffle_prob=shuffle_prob)
    total = inpaint_prob + outpaint_prob + shuffle_prob
    if total > 1.0:
        raise ValueError(f"inpaint_prob + outpaint_prob + shuffle_prob must be <= 1, got {total}")
    return OneOf(
        [RandInPaintd(keys), RandOutPaintd(keys), RandLocalShuffled(keys, prob=1.0), Identityd(keys)],
        weights=[inpaint_prob, outpaint_prob, shuffle_prob, 1.0 - total],
    )


# The named mixes, each a function ``(keys, **probabilities) -> transform``.
DISTORTIONS: dict[str, Callable[..., Compose | OneOf]] = {
    "genesis": genesis_distortions,
    "exclusive": exclusive_distortions,
}


def distortions(name: str, keys: KeysCollection, **probabilities: float) -> Compose | OneOf:
    """The mix ``name`` of :data:`DISTORTIONS` on ``keys``, with its probabilities overridden by ``probabilities``.

    Raises:
        ValueError: an unknown ``name`` (the known ones are listed) or a bad probability.
        TypeError: a probability the mix does not have.
    """
    if name not in DISTORTIONS:
        raise ValueError(f"distortion must be one of {sorted(DISTORTIONS)}, got {name!r}")
    return DISTORTIONS[name](keys, **probabilities)
