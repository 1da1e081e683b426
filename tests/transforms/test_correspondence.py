from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from torch import nn

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
from medssl3d.transforms.feature_match import FeatureProvider, centred_features


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
    # the features are centred: a far cell does not pass the threshold (un-centred cosines are above 0.9 here)
    assert provider.score(vol_q, vol_k, p, p + np.array([12.0, -12.0, 12.0])) < 0.7


def _all_voxel_ncc(a, b):
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    return (a * b).mean() / np.sqrt((a * a).mean() * (b * b).mean())


def test_local_ncc_scores_the_content_not_the_body_outline():
    q = _windowed((48, 48, 48))
    body = q > 0
    k = q.copy()
    k[body] = np.random.RandomState(0).permutation(q[body])  # same outline and intensities, scrambled content
    vol_q, vol_k = Volume(q, (1.5,) * 3), Volume(k, (1.5,) * 3)
    centre, crop = (24, 24, 24), (64, 64, 64)  # the crop reaches 8 voxels past every face of the volumes
    assert local_ncc(vol_q, centre, vol_q, centre, crop, 2) == pytest.approx(1.0)
    assert local_ncc(vol_q, centre, vol_k, centre, crop, 2) < 0.1
    # over all voxels, padding and air included, the outline alone passes the 0.7 threshold
    a, _ = extract_patch(q, centre, crop, 2)
    b, _ = extract_patch(k, centre, crop, 2)
    assert _all_voxel_ncc(a, b) > 0.7


def test_local_ncc_counts_pairs_inside_both_volumes_with_one_body_voxel():
    rng = np.random.RandomState(1)
    q, k = rng.uniform(0.0, 1.0, (10, 10, 10)), rng.uniform(0.0, 1.0, (12, 12, 12))
    q[:5] = 0.0  # air
    k = 0.5 * k + 0.5 * np.pad(q, 1)  # k[i + 1] correlates with q[i]
    k[:, :6] = 0.0
    vol_q, vol_k = Volume(q.astype(np.float32), (1.0,) * 3), Volume(k.astype(np.float32), (1.0,) * 3)
    p, p_k, size = (8, 8, 8), (9, 9, 9), (8, 8, 8)  # crops from voxel 4 of Q and 5 of K: both leave their volume
    a = np.full(size, np.nan)
    b = np.full(size, np.nan)
    a[:6, :6, :6] = q[4:, 4:, 4:]
    b[:7, :7, :7] = k[5:, 5:, 5:]
    counted = ~np.isnan(a) & ~np.isnan(b) & ((a > 0) | (b > 0))
    want = np.corrcoef(a[counted], b[counted])[0, 1]
    assert local_ncc(vol_q, p, vol_k, p_k, size, 1) == pytest.approx(want, rel=1e-5)
    assert local_ncc(vol_q, p, vol_k, p_k, size, 1, foreground_threshold=2.0) == 0.0  # nothing counts


def test_centred_features_subtract_the_foreground_mean():
    features = torch.tensor([[1.0, 3.0, 5.0], [0.0, 0.0, 2.0]]).reshape(2, 1, 1, 3)
    foreground = torch.tensor([True, True, False]).reshape(1, 1, 3)
    want = torch.tensor([[-1.0, 1.0, 3 / 13**0.5], [0.0, 0.0, 2 / 13**0.5]]).reshape(2, 1, 1, 3)
    torch.testing.assert_close(centred_features(features, foreground), want)
    torch.testing.assert_close(centred_features(features, torch.zeros_like(foreground)),
                               F.normalize(features - features.mean((1, 2, 3), keepdim=True), dim=0))


class NeighbourhoodEncoder(nn.Module):
    """A translation-equivariant teacher stand-in with a common component, as transformer features have.

    At strides 2, 4, 8 and 16 the descriptor of a cell is the mean intensity of its 3 x 3 x 3 neighbourhood of
    cells (one-hot 3 x 3 x 3 kernels) plus a bias of 1 on every channel: un-centred cosines are near 1 anywhere.
    """

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 27, kernel_size=3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(27).reshape(27, 1, 3, 3, 3))
            self.conv.bias.fill_(1.0)

    def forward(self, x):
        return SimpleNamespace(features=[self.conv(F.avg_pool3d(x, 2 ** (i + 1))) for i in range(4)])


def test_feature_score_separates_the_true_match_from_wrong_points_on_a_shifted_copy():
    q = _windowed((64, 64, 64))
    shift = np.array([16.0, 8.0, 0.0])
    noise = np.random.RandomState(5).normal(0.0, 0.02, q.shape)
    k = np.zeros((96, 96, 64), np.float32)
    k[16:80, 8:72] = np.where(q > 0, np.clip(q + noise, 0.0, 1.0), 0.0)  # K = Q shifted, new noise in the body
    vol_q, vol_k = Volume(q, (1.5,) * 3), Volume(k, (1.5,) * 3)
    provider = FeatureProvider(warmup_steps=0)
    provider.update_teacher(NeighbourhoodEncoder(), step=0)
    rng = np.random.RandomState(0)
    body = np.flatnonzero(q > 0)
    errors, true_scores, wrong_scores = [], [], []
    for _ in range(30):
        p = np.asarray(np.unravel_index(body[rng.randint(body.size)], q.shape), dtype=np.float64)
        p_k, _ = provider(vol_q, vol_k, p)
        errors.append(np.abs(p_k - (p + shift)).max())
        true_scores.append(provider.score(vol_q, vol_k, p, p + shift))
        wrong = p + shift + np.array([24.0 if p[0] < 32 else -24.0, 0.0, 0.0])  # 36 mm off, inside K
        wrong_scores.append(provider.score(vol_q, vol_k, p, wrong))
    true_scores, wrong_scores = np.asarray(true_scores), np.asarray(wrong_scores)
    assert np.mean(np.asarray(errors) <= 8) >= 0.9  # within one stride-8 cell
    assert np.mean(true_scores >= 0.7) >= 0.8  # true pairs are accepted...
    assert np.mean(wrong_scores >= 0.7) <= 0.1  # ...wrong ones are not
    assert np.mean(true_scores - wrong_scores >= 0.3) >= 0.9
