import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medssl3d.data.phantoms import make_phantom
from medssl3d.networks.backbones import SwinBackbone
from medssl3d.transforms.correspondence import (
    BodyBoxProvider,
    SameVolumeProvider,
    Volume,
    extract_patch,
    foreground_box,
    local_ncc,
)
from medssl3d.transforms.feature_match import FeatureProvider


def _windowed(shape=(40, 40, 40), seed=0):
    # CT phantom windowed like the CT preset: HU -125..225 -> 0..1, air at 0.
    image = make_phantom(shape=shape, seed=seed).image
    return np.clip((image + 125.0) / 350.0, 0.0, 1.0).astype(np.float32)


def test_volume_reads_spacing_and_case_from_a_metatensor():
    affine = torch.diag(torch.tensor([1.5, 2.0, 3.0, 1.0], dtype=torch.float64))
    image = MetaTensor(torch.zeros(1, 4, 5, 6), affine=affine, meta={"filename_or_obj": "/data/case7.nii.gz"})
    vol = Volume.from_image(image)
    assert vol.shape == (4, 5, 6) and vol.spacing == (1.5, 2.0, 3.0) and vol.case_id == "/data/case7.nii.gz"
    with pytest.raises(ValueError, match="one channel"):
        Volume.from_image(torch.zeros(2, 4, 4, 4))


def test_extract_patch_pads_outside_and_strides():
    a = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    patch, start = extract_patch(a, (0, 0, 0), (4, 4, 4), fill=-1)
    np.testing.assert_array_equal(start, [-2, -2, -2])
    assert (patch[:2] == -1).all() and (patch[:, :2] == -1).all() and (patch[:, :, :2] == -1).all()
    np.testing.assert_array_equal(patch[2:, 2:, 2:], a[:2, :2, :2])
    strided, _ = extract_patch(a, (2, 3, 3), (5, 6, 7), stride=2)
    np.testing.assert_array_equal(strided, a[::2, ::2, ::2])
    t, _ = extract_patch(torch.from_numpy(a)[None], (2, 3, 3), (3, 3, 3))
    assert torch.equal(t[0], torch.from_numpy(a[1:4, 2:5, 2:5]))


def test_body_box_is_exact_on_a_scaled_and_shifted_copy():
    q = _windowed()
    factors, offset = np.array([2, 1, 3]), np.array([3, 5, 0])
    k = q
    for axis, f in enumerate(factors):
        k = np.repeat(k, f, axis=axis)
    k = np.pad(k, [(o, 2) for o in offset])
    vol_q, vol_k = Volume(q, (1.5,) * 3), Volume(k, (1.5,) * 3)
    provider = BodyBoxProvider(crop_size=(16, 16, 16))
    for p in ([20.0, 20.0, 20.0], [9.0, 31.0, 4.0], [27.0, 12.0, 35.0]):
        p_k, score = provider(vol_q, vol_k, np.array(p))
        # voxel i of an f-fold repeat spans [f i, f i + f): its centre is f i + (f - 1) / 2
        np.testing.assert_allclose(p_k, factors * p + (factors - 1) / 2 + offset, atol=1e-9)
        assert 0.0 <= score <= 1.0


def test_foreground_box_and_local_ncc_known_answers():
    a = np.zeros((10, 10, 10), np.float32)
    a[2:5, 3:9, 0:10] = 1.0
    lo, hi = foreground_box(a, 0.0)
    np.testing.assert_array_equal(lo, [1.5, 2.5, -0.5])
    np.testing.assert_array_equal(hi, [4.5, 8.5, 9.5])
    vol = Volume(_windowed(), (1.5,) * 3)
    assert local_ncc(vol, (20, 20, 20), vol, (20, 20, 20), (16, 16, 16), 2) == pytest.approx(1.0)
    flat = Volume(np.ones((40, 40, 40), np.float32), (1.5,) * 3)
    assert local_ncc(vol, (20, 20, 20), flat, (20, 20, 20), (16, 16, 16), 2) == 0.0


def test_same_volume_jitter_is_bounded_and_scored_by_overlap():
    vol = Volume(_windowed(), (1.5,) * 3)
    provider = SameVolumeProvider(crop_size=(16, 16, 16), max_shift=0.25)
    provider.set_random_state(seed=3)
    for _ in range(20):
        p = np.array([20.0, 20.0, 20.0])
        p_k, score = provider(vol, vol, p)
        shift = np.abs(p_k - p)
        assert (shift <= 4).all()
        assert score == pytest.approx(np.prod(1 - shift / 16))
    first = SameVolumeProvider(crop_size=(16,) * 3).set_random_state(seed=1)(vol, vol, np.array([5.0, 5, 5]))
    again = SameVolumeProvider(crop_size=(16,) * 3).set_random_state(seed=1)(vol, vol, np.array([5.0, 5, 5]))
    np.testing.assert_array_equal(first[0], again[0])


def test_feature_provider_falls_back_before_warmup_then_matches_by_teacher_features():
    torch.manual_seed(0)
    q = _windowed((32, 32, 32))
    vol_q, vol_k = Volume(q, (1.5,) * 3), Volume(q.copy(), (1.5,) * 3)
    provider = FeatureProvider(warmup_steps=5, refresh_every=10)
    p = np.array([13.0, 17.0, 9.0])
    np.testing.assert_allclose(provider(vol_q, vol_k, p)[0], BodyBoxProvider().map_point(vol_q, vol_k, p))
    encoder = SwinBackbone("tiny")
    assert not provider.update_teacher(encoder, step=4) and not provider.active
    assert provider.update_teacher(encoder, step=5) and provider.active
    assert not provider.update_teacher(encoder, step=14)
    assert all(not w.requires_grad for w in provider.encoder.parameters())
    p_k, score = provider(vol_q, vol_k, p)
    # identical content: the best cell is p's own stride-8 cell (centre within 4 voxels); the score is
    # near 1 (the stride-16 map is interpolated onto the stride-8 grid before averaging)
    assert np.abs(p_k - p).max() <= 4
    assert 0.95 < score <= 1.0
