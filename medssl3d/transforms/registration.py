"""Registration correspondence provider: every case registered once to a template, cached on disk.

``docs/methods.md`` (section "Alice", view step 3): each volume is registered to a template with
SimpleITK (affine, optionally followed by a B-spline) at a coarse spacing; the transform of a case
is computed once and cached (in memory and, with ``cache_dir``, on disk, written atomically so
DataLoader workers and DDP ranks can share the folder). A point ``p`` of Q maps to the template by
Q's transform and back into K by the inverse of K's transform; the score is the local NCC of the two
crops over the body.

Coordinates are millimetres ``index * spacing`` along the array axes (origin at voxel 0): the
preprocessed volumes share one orientation, and the registration absorbs their different origins.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medssl3d.data.atomic_files import atomic_open
from medssl3d.transforms.correspondence import (
    DEFAULT_CROP,
    DEFAULT_FOREGROUND_THRESHOLD,
    DEFAULT_NCC_STRIDE,
    CorrespondenceProvider,
    Volume,
    local_ncc,
)

logger = logging.getLogger(__name__)

__all__ = ["CaseTransform", "RegistrationProvider", "register_to_template"]

DEFAULT_COARSE_SPACING = 3.0
"""mm: registration runs on volumes resampled to this isotropic spacing."""
#: Anti-aliasing sigmas below this fraction of the input spacing are skipped (a no-op that ITK may refuse).
MIN_SMOOTHING = 0.01
DEFAULT_AFFINE_ITERATIONS = 200
DEFAULT_BSPLINE_ITERATIONS = 20
DEFAULT_BSPLINE_MESH = 4
"""B-spline control-grid cells per axis over the case's extent."""
BSPLINE_SAMPLING = 0.2
"""Fraction of coarse voxels the B-spline metric samples (a fixed seed keeps it deterministic)."""
BSPLINE_SEED = 1
DEFAULT_HISTOGRAM_BINS = 32
"""Mattes mutual information bins (MI tolerates intensity differences between subjects)."""
SHRINK_FACTORS = (2, 1)
SMOOTHING_SIGMAS = (1.0, 0.0)
"""Two-level pyramid (in coarse voxels)."""
LEARNING_RATE = 1.0
MIN_STEP = 1e-4
GRADIENT_TOLERANCE = 1e-8
FIELD_SUBSAMPLE = 4
"""The B-spline residual field is stored every 4 coarse voxels (the spline is far smoother than that)."""
INVERSE_ITERATIONS = 10
"""Fixed-point iterations inverting ``x -> A x + b + d(x)`` (exact in one for a pure affine)."""
DEFAULT_MEMORY_CACHE = 256
"""Case transforms kept in memory (small: a 4x4 matrix and an optional coarse field)."""
CACHE_VERSION = 2
"""2: registrations run wholly on ``threads`` (version 1 let SimpleITK's global default decide part)."""
HASH_CHARS = 20


@dataclass(eq=False)
class CaseTransform:
    """Case millimetres -> template millimetres: ``y = A x + b + d(x)``.

    Attributes:
        matrix: ``(4, 4)`` homogeneous affine ``[A b; 0 1]``.
        field: residual displacement ``(3, d, h, w)`` mm of the B-spline stage on a grid of
            ``field_spacing`` mm starting at the case's voxel 0; None for affine only.
        field_spacing: grid spacing of ``field`` (mm).
    """

    matrix: np.ndarray
    field: np.ndarray | None = None
    field_spacing: float = 1.0

    def _residual(self, x: np.ndarray) -> np.ndarray:
        if self.field is None:
            return np.zeros(3)
        return _trilinear(self.field, np.asarray(x, dtype=np.float64) / self.field_spacing)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Map a case point (3,) mm to the template."""
        return self.matrix[:3, :3] @ x + self.matrix[:3, 3] + self._residual(x)

    def inverse(self, y: np.ndarray) -> np.ndarray:
        """Map a template point (3,) mm into the case (fixed-point inversion of the residual)."""
        a_inv = np.linalg.inv(self.matrix[:3, :3])
        base = np.asarray(y, dtype=np.float64) - self.matrix[:3, 3]
        x = a_inv @ base
        if self.field is not None:
            for _ in range(INVERSE_ITERATIONS):
                x = a_inv @ (base - self._residual(x))
        return x


def _trilinear(field: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Trilinear value of ``field`` (C, d, h, w) at grid position ``idx`` (3,), clamped to the grid."""
    hi = np.asarray(field.shape[1:]) - 1
    idx = np.clip(idx, 0, hi)
    lo = np.minimum(np.floor(idx).astype(np.int64), np.maximum(hi - 1, 0))
    w = idx - lo
    out = np.zeros(field.shape[0])
    for corner in np.ndindex(2, 2, 2):
        c = np.asarray(corner)
        weight = np.prod(np.where(c == 1, w, 1.0 - w))
        pos = np.minimum(lo + c, hi)
        out += weight * field[:, pos[0], pos[1], pos[2]]
    return out


def _to_sitk(array: np.ndarray, spacing: Sequence[float]) -> sitk.Image:
    # Transposed so that SimpleITK's index (i, j, k) is array[i, j, k]: points keep the array axis order.
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0), dtype=np.float32))
    image.SetSpacing(tuple(float(s) for s in spacing))
    return image


def _coarse(volume: Volume, spacing: float) -> sitk.Image:
    image = _to_sitk(volume.array, volume.spacing)
    extent = np.asarray(volume.shape) * np.asarray(volume.spacing)
    size = [max(int(np.ceil(e / spacing)), 1) for e in extent]
    # Smooth before subsampling (anti-aliasing), sigma in mm: half the coarse spacing. Axis by axis, and only
    # along axes that are subsampled: ITK refuses a zero sigma, and a volume already at (or a rounding error
    # below) the coarse spacing on some axis needs none there.
    for axis, s in enumerate(volume.spacing):
        sigma = (spacing - s) / 2.0
        if sigma > MIN_SMOOTHING * s:
            image = sitk.RecursiveGaussian(image, sigma, False, sitk.RecursiveGaussianImageFilter.ZeroOrder, axis)
    return sitk.Resample(
        image, size, sitk.Transform(), sitk.sitkLinear, (0.0, 0.0, 0.0), (spacing,) * 3, np.eye(3).ravel().tolist()
    )


def _affine_matrix(t: sitk.AffineTransform) -> np.ndarray:
    a = np.asarray(t.GetMatrix()).reshape(3, 3)
    c, tr = np.asarray(t.GetCenter()), np.asarray(t.GetTranslation())
    m = np.eye(4)
    m[:3, :3] = a
    m[:3, 3] = -a @ c + c + tr
    return m


@contextlib.contextmanager
def _simpleitk_threads(threads: int | None) -> Iterator[None]:
    """Run every SimpleITK call inside on ``threads`` threads (None: leave SimpleITK's default).

    ``ImageRegistrationMethod.SetNumberOfThreads`` does not reach all of the registration's filters; the rest use
    the process-wide default, whose thread pool splits sums by load, so that the result changes from run to run.
    """
    if threads is None:
        yield
        return
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)


def _method(iterations: int, threads: int | None, bins: int) -> sitk.ImageRegistrationMethod:
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=bins)
    reg.SetMetricSamplingStrategy(reg.NONE)  # every voxel of the coarse grid: deterministic
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetShrinkFactorsPerLevel(list(SHRINK_FACTORS))
    reg.SetSmoothingSigmasPerLevel(list(SMOOTHING_SIGMAS))
    if threads is not None:
        reg.SetNumberOfThreads(threads)
    return reg


def register_to_template(
    case: sitk.Image,
    template: sitk.Image,
    *,
    bspline: bool = False,
    affine_iterations: int = DEFAULT_AFFINE_ITERATIONS,
    bspline_iterations: int = DEFAULT_BSPLINE_ITERATIONS,
    bspline_mesh: int = DEFAULT_BSPLINE_MESH,
    histogram_bins: int = DEFAULT_HISTOGRAM_BINS,
    threads: int | None = 1,
) -> CaseTransform:
    """Register ``case`` (fixed) to ``template`` (moving): the transform maps case points to template points.

    Args:
        case: the case at the coarse spacing (SimpleITK image, identity direction, origin 0).
        template: the template at the coarse spacing.
        bspline: refine the affine with a B-spline of ``bspline_mesh`` cells per axis.
        affine_iterations: optimiser iterations of the affine stage (per pyramid level).
        bspline_iterations: L-BFGS-B iterations of the B-spline stage (per pyramid level).
        bspline_mesh: B-spline control-grid cells per axis.
        histogram_bins: Mattes MI bins.
        threads: SimpleITK threads (1 in DataLoader workers avoids oversubscription; None: SimpleITK's default,
            whose results vary from run to run).

    Returns:
        The case's :class:`CaseTransform`.
    """
    with _simpleitk_threads(threads):
        return _register(case, template, bspline, affine_iterations, bspline_iterations, bspline_mesh,
                         histogram_bins, threads)


def _register(case: sitk.Image, template: sitk.Image, bspline: bool, affine_iterations: int, bspline_iterations: int,
              bspline_mesh: int, histogram_bins: int, threads: int | None) -> CaseTransform:
    initial = sitk.CenteredTransformInitializer(
        case, template, sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.MOMENTS
    )
    reg = _method(affine_iterations, threads, histogram_bins)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=LEARNING_RATE,
        minStep=MIN_STEP,
        numberOfIterations=affine_iterations,
        gradientMagnitudeTolerance=GRADIENT_TOLERANCE,
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetInitialTransform(initial, inPlace=True)
    reg.Execute(case, template)
    affine = sitk.AffineTransform(initial)
    matrix = _affine_matrix(affine)
    if not bspline:
        return CaseTransform(matrix=matrix)

    spline = sitk.BSplineTransformInitializer(case, [bspline_mesh] * 3)
    reg = _method(bspline_iterations, threads, histogram_bins)
    # The affine already did the coarse work: one level, on a fixed random sample of the voxels.
    reg.SetShrinkFactorsPerLevel([1])
    reg.SetSmoothingSigmasPerLevel([0.0])
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(BSPLINE_SAMPLING, BSPLINE_SEED)
    reg.SetOptimizerAsLBFGSB(numberOfIterations=bspline_iterations)
    reg.SetMovingInitialTransform(affine)  # y = affine(spline(x))
    reg.SetInitialTransform(spline, inPlace=True)
    reg.Execute(case, template)
    field_spacing = case.GetSpacing()[0] * FIELD_SUBSAMPLE
    size = [max(int(np.ceil(n / FIELD_SUBSAMPLE)) + 1, 2) for n in case.GetSize()]
    disp = sitk.TransformToDisplacementField(
        spline, sitk.sitkVectorFloat64, size, (0.0, 0.0, 0.0), (field_spacing,) * 3, np.eye(3).ravel().tolist()
    )
    u = sitk.GetArrayFromImage(disp).transpose(2, 1, 0, 3)  # (d, h, w, 3) in array axis order
    # affine(x + u) = A x + b + A u: the residual after the affine part is A u.
    field = np.einsum("ij,dhwj->idhw", matrix[:3, :3], u).astype(np.float32)
    return CaseTransform(matrix=matrix, field=field, field_spacing=field_spacing)


def _save_atomic(path: Path, t: CaseTransform) -> None:
    arrays = {"matrix": t.matrix, "field_spacing": np.float64(t.field_spacing)}
    if t.field is not None:
        arrays["field"] = t.field
    with atomic_open(path) as f:
        np.savez(f, **arrays)


def _load(path: Path) -> CaseTransform | None:
    try:
        with np.load(path) as z:
            field = z["field"] if "field" in z.files else None
            return CaseTransform(matrix=z["matrix"], field=field, field_spacing=float(z["field_spacing"]))
    except (OSError, ValueError, KeyError) as err:
        logger.warning("ignoring unreadable registration cache %s (%s)", path, err)
        return None


class RegistrationProvider(CorrespondenceProvider):
    """``p' = T_K^{-1}(T_Q(p))`` with ``T_c`` the registration of case ``c`` to a template.

    Args:
        template: the template volume (a :class:`Volume`, or a ``(1, D, H, W)`` MetaTensor / array,
            e.g. the first preprocessed case of the dataset); it is kept only at the coarse spacing.
        coarse_spacing: isotropic spacing (mm) of the registration.
        bspline: add a B-spline stage after the affine.
        cache_dir: folder of the on-disk cache (one ``.npz`` per case and setting); None: memory only.
        crop_size: crop side (voxels) of the NCC score.
        ncc_stride: sampling stride of the NCC score.
        foreground_threshold: intensity above which a voxel is body (the voxels the NCC score counts).
        affine_iterations: see :func:`register_to_template`.
        bspline_iterations: see :func:`register_to_template`.
        bspline_mesh: see :func:`register_to_template`.
        histogram_bins: see :func:`register_to_template`.
        threads: see :func:`register_to_template`.
        memory_cache: case transforms kept in memory.

    Raises:
        ValueError: a non-positive ``coarse_spacing``.
    """

    name = "registration"

    def __init__(
        self,
        template,
        *,
        coarse_spacing: float = DEFAULT_COARSE_SPACING,
        bspline: bool = False,
        cache_dir: str | os.PathLike | None = None,
        crop_size: Sequence[int] = DEFAULT_CROP,
        ncc_stride: int = DEFAULT_NCC_STRIDE,
        foreground_threshold: float = DEFAULT_FOREGROUND_THRESHOLD,
        affine_iterations: int = DEFAULT_AFFINE_ITERATIONS,
        bspline_iterations: int = DEFAULT_BSPLINE_ITERATIONS,
        bspline_mesh: int = DEFAULT_BSPLINE_MESH,
        histogram_bins: int = DEFAULT_HISTOGRAM_BINS,
        threads: int | None = 1,
        memory_cache: int = DEFAULT_MEMORY_CACHE,
    ) -> None:
        if coarse_spacing <= 0:
            raise ValueError(f"coarse_spacing must be > 0 mm, got {coarse_spacing}")
        template = template if isinstance(template, Volume) else Volume.from_image(template)
        self.coarse_spacing = float(coarse_spacing)
        coarse = _coarse(template, self.coarse_spacing)
        # numpy, not a SimpleITK image, so the provider pickles into DataLoader workers
        self._template = sitk.GetArrayFromImage(coarse)
        self.bspline = bspline
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.crop_size = tuple(int(s) for s in crop_size)
        self.ncc_stride = ncc_stride
        self.foreground_threshold = foreground_threshold
        self.options = {
            "bspline": bspline,
            "affine_iterations": affine_iterations,
            "bspline_iterations": bspline_iterations,
            "bspline_mesh": bspline_mesh,
            "histogram_bins": histogram_bins,
            "threads": threads,
        }
        self.memory_cache = memory_cache
        self._cache: collections.OrderedDict[str, CaseTransform] = collections.OrderedDict()
        digest = hashlib.sha1(self._template.tobytes()).hexdigest()
        settings = {k: v for k, v in self.options.items() if k != "threads"}
        self._setting_key = json.dumps(
            {"template": digest, "spacing": self.coarse_spacing, "version": CACHE_VERSION, **settings},
            sort_keys=True,
        )

    def template_image(self) -> sitk.Image:
        """The template at the coarse spacing."""
        image = sitk.GetImageFromArray(self._template)
        image.SetSpacing((self.coarse_spacing,) * 3)
        return image

    def _key(self, volume: Volume) -> str:
        # A case is its file and its preprocessed geometry; without a file name, its content.
        ident = volume.case_id or hashlib.sha1(volume.array.tobytes()).hexdigest()
        blob = json.dumps([self._setting_key, ident, volume.shape, volume.spacing])
        return hashlib.sha1(blob.encode()).hexdigest()[:HASH_CHARS]

    def case_transform(self, volume: Volume) -> CaseTransform:
        """The case's transform to the template: from memory, else from disk, else registered (and cached)."""
        key = self._key(volume)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        path = self.cache_dir / f"{key}.npz" if self.cache_dir is not None else None
        t = _load(path) if path is not None and path.is_file() else None
        if t is None:
            t = register_to_template(_coarse(volume, self.coarse_spacing), self.template_image(), **self.options)
            logger.debug("registered %s to the template", volume.case_id or key)
            if path is not None:
                _save_atomic(path, t)
        self._cache[key] = t
        while len(self._cache) > self.memory_cache:
            self._cache.popitem(last=False)
        return t

    def map_point(self, vol_q: Volume, vol_k: Volume, p: np.ndarray) -> np.ndarray:
        """``p'`` alone (no score)."""
        x_q = np.asarray(p, dtype=np.float64) * np.asarray(vol_q.spacing)
        y = self.case_transform(vol_q).forward(x_q)
        return self.case_transform(vol_k).inverse(y) / np.asarray(vol_k.spacing)

    def __call__(self, vol_q: Volume, vol_k: Volume, p: np.ndarray) -> tuple[np.ndarray, float]:
        """Map ``p`` through the template and score the pair by local NCC over the body."""
        p_k = self.map_point(vol_q, vol_k, p)
        return p_k, local_ncc(vol_q, p, vol_k, p_k, self.crop_size, self.ncc_stride, self.foreground_threshold)
