import numpy as np
import pytest
import SimpleITK as sitk

from medssl3d.data.phantoms import make_phantom
from medssl3d.transforms import registration
from medssl3d.transforms.correspondence import Volume, local_ncc
from medssl3d.transforms.registration import CaseTransform, RegistrationProvider

SPACING = (1.5, 1.5, 1.5)
# K(x) = Q(A (x - c) + c + t): scaled by 1/1.1, rotated 10 degrees about axis 0, translated
ANGLE, SCALE = np.deg2rad(10.0), 1.1
CENTRE, SHIFT = np.array([36.0, 36.0, 36.0]), np.array([4.0, -3.0, 5.0])
POINTS = np.array([[24.0, 24.0, 24.0], [15.0, 30.0, 20.0], [30.0, 18.0, 28.0]])


def _matrix():
    c, s = np.cos(ANGLE), np.sin(ANGLE)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]]) / SCALE


@pytest.fixture(scope="module")
def pair():
    image = make_phantom(shape=(48, 48, 48), spacing=SPACING, seed=0).image
    q = np.clip((image + 125.0) / 350.0, 0.0, 1.0).astype(np.float32)
    t = sitk.AffineTransform(3)
    t.SetMatrix(_matrix().ravel().tolist())
    t.SetCenter(CENTRE.tolist())
    t.SetTranslation(SHIFT.tolist())
    moved = sitk.Resample(registration._to_sitk(q, SPACING), [52] * 3, t, sitk.sitkLinear, (0.0,) * 3, SPACING,
                          np.eye(3).ravel().tolist(), 0.0)
    k = sitk.GetArrayFromImage(moved).transpose(2, 1, 0).copy()
    return Volume(q, SPACING, "q"), Volume(k, SPACING, "k")


def _truth(p):
    # the K point x with A (x - c) + c + t = p (mm), in voxels
    x = np.linalg.inv(_matrix()) @ (p * SPACING[0] - CENTRE - SHIFT) + CENTRE
    return x / SPACING[0]


@pytest.mark.parametrize("bspline", [False, True], ids=["affine", "bspline"])
def test_points_map_within_two_voxels_of_a_known_affine(pair, bspline, tmp_path, monkeypatch):
    vol_q, vol_k = pair
    provider = RegistrationProvider(vol_q, bspline=bspline, bspline_iterations=10, cache_dir=tmp_path,
                                    crop_size=(32, 32, 32))
    mapped = [provider(vol_q, vol_k, p) for p in POINTS]
    for p, (p_k, score) in zip(POINTS, mapped, strict=True):
        assert np.abs(p_k - _truth(p)).max() < 2.0
        assert 0.7 <= score <= 1.0  # the body-only NCC accepts the true match...
        wrong = p_k + np.array([10.0, 0.0, 0.0])  # ...not one 15 mm off
        body = provider.foreground_threshold
        assert local_ncc(vol_q, p, vol_k, wrong, provider.crop_size, foreground_threshold=body) < 0.5
    assert len(list(tmp_path.glob("*.npz"))) == 2  # one per case

    # a fresh provider (another worker) reads the cache instead of registering again
    def refuse(*args, **kwargs):
        raise AssertionError("registered although cached")

    monkeypatch.setattr(registration, "register_to_template", refuse)
    again = RegistrationProvider(vol_q, bspline=bspline, bspline_iterations=10, cache_dir=tmp_path,
                                 crop_size=(32, 32, 32))
    for p, (p_k, _) in zip(POINTS, mapped, strict=True):
        np.testing.assert_allclose(again.map_point(vol_q, vol_k, p), p_k)


def test_case_transform_inverse_undoes_forward_with_a_residual_field():
    rng = np.random.default_rng(0)
    matrix = np.eye(4)
    matrix[:3, :3] = [[1.1, 0.1, 0.0], [0.0, 0.9, 0.05], [0.0, 0.0, 1.0]]
    matrix[:3, 3] = [3.0, -2.0, 1.0]
    field = rng.normal(scale=0.5, size=(3, 6, 6, 6)).astype(np.float32)
    t = CaseTransform(matrix=matrix, field=field, field_spacing=12.0)
    for x in ([10.0, 20.0, 30.0], [40.0, 5.0, 17.0]):
        np.testing.assert_allclose(t.inverse(t.forward(np.array(x))), x, atol=1e-4)


def test_bad_arguments_are_refused(pair):
    with pytest.raises(ValueError, match="coarse_spacing"):
        RegistrationProvider(pair[0], coarse_spacing=0)


def test_coarse_smooths_only_the_subsampled_axes():
    # A volume already at the coarse spacing along one axis is
    # smoothed along the other two only; ITK refuses a zero sigma, so a joint filter failed on such volumes.
    rng = np.random.default_rng(0)
    array = rng.random((40, 30, 20)).astype(np.float32)
    spacing = (1.0, 1.5, 3.0)
    coarse = sitk.GetArrayFromImage(registration._coarse(Volume(array, spacing), 3.0))
    image = registration._to_sitk(array, spacing)
    for axis, sigma in ((0, 1.0), (1, 0.75)):
        image = sitk.RecursiveGaussian(image, sigma, False, sitk.RecursiveGaussianImageFilter.ZeroOrder, axis)
    want = sitk.GetArrayFromImage(sitk.Resample(image, [14, 15, 20], sitk.Transform(), sitk.sitkLinear,
                                                (0.0,) * 3, (3.0,) * 3, np.eye(3).ravel().tolist()))
    np.testing.assert_allclose(coarse, want, atol=1e-5)
    # with every axis subsampled it is the joint Gaussian of the same sigmas
    iso = (1.0, 1.5, 2.0)
    joint = sitk.SmoothingRecursiveGaussian(registration._to_sitk(array, iso), [1.0, 0.75, 0.5])
    want = sitk.GetArrayFromImage(sitk.Resample(joint, [14, 15, 14], sitk.Transform(), sitk.sitkLinear,
                                                (0.0,) * 3, (3.0,) * 3, np.eye(3).ravel().tolist()))
    np.testing.assert_allclose(sitk.GetArrayFromImage(registration._coarse(Volume(array, iso), 3.0)), want, atol=1e-4)


@pytest.mark.parametrize("bspline", [False, True], ids=["affine", "bspline"])
def test_one_thread_registration_ignores_simpleitk_global_threads(pair, bspline):
    # SimpleITK's thread pool splits the metric's sums by load: the chest CT pool's registrations moved by up to
    # 6 mm between two runs before every SimpleITK call of a registration ran on the `threads` asked for.
    vol_q, vol_k = pair
    case, template = (registration._coarse(v, 1.5) for v in (vol_k, vol_q))
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    results = []
    try:
        for global_threads in (1, 4, 4):
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(global_threads)
            t = registration.register_to_template(case, template, bspline=bspline, bspline_iterations=5, threads=1)
            results.append(t)
            assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == global_threads  # left as it was
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)
    for t in results[1:]:
        np.testing.assert_array_equal(t.matrix, results[0].matrix)
        if bspline:
            np.testing.assert_array_equal(t.field, results[0].field)
