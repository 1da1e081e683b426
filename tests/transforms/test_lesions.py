import numpy as np
import pytest
import torch
from monai.transforms import Compose
from monai.utils import set_determinism

from medssl3d.data.phantoms import make_phantom
from medssl3d.transforms.lesions import RandSyntheticLesion, RandSyntheticLesiond, abnormal_tokens

SHAPE = (64, 64, 64)
PATCH = 16


@pytest.fixture(scope="module")
def volume():
    # A CT phantom windowed to [0, 1]: air at 0, body above.
    image = make_phantom(shape=SHAPE, seed=0).image
    return torch.from_numpy(np.clip((image + 125.0) / 350.0, 0, 1).astype(np.float32))[None]


def test_lesions_respect_the_configured_geometry(volume):
    t = RandSyntheticLesion(extent_fraction=(0.07, 0.57))
    counts = set()
    for seed in range(20):
        t.set_random_state(seed)
        out = t(volume)
        counts.add(len(t.lesions))
        assert 1 <= len(t.lesions) <= 4
        for les in t.lesions:
            for e, side in zip(les.extent, SHAPE, strict=True):
                assert round(0.07 * side) <= e <= round(0.57 * side)
            assert volume[0][les.centre] > 0  # centred on foreground
            assert 0.0 <= les.strength <= 0.5
            assert les.texture_size == tuple(round(0.27 * s) for s in SHAPE)
        m = out.lesion_map
        assert m.shape == volume.shape and float(m.min()) >= 0.0
        torch.testing.assert_close(out.lesioned, torch.where(m > 0, (volume + m).clamp(0.0, 0.92), volume))
        # Lesion voxels all lie in the union of the lesions' boxes.
        inside = torch.zeros(SHAPE, dtype=torch.bool)
        for les in t.lesions:
            lo = [max(c - e // 2, 0) for c, e in zip(les.centre, les.extent, strict=True)]
            hi = [c - e // 2 + e for c, e in zip(les.centre, les.extent, strict=True)]
            inside[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = True
        assert not bool((m[0] > 0)[~inside].any())
    assert counts == {1, 2, 3, 4}


def test_abnormal_tokens_are_the_patches_with_lesion(volume):
    t = RandSyntheticLesion()
    t.set_random_state(3)
    out = t(volume)
    g = SHAPE[0] // PATCH
    expected = torch.zeros(g, g, g, dtype=torch.bool)
    for i in range(g):
        for j in range(g):
            for k in range(g):
                patch = out.lesion_map[
                    0, i * PATCH : (i + 1) * PATCH, j * PATCH : (j + 1) * PATCH, k * PATCH : (k + 1) * PATCH
                ]
                expected[i, j, k] = bool((patch > 0).any())
    assert out.abnormal.shape == (g**3,)
    assert torch.equal(out.abnormal, expected.flatten())
    assert 0 < int(out.abnormal.sum()) < g**3
    batched = abnormal_tokens(out.lesion_map[None].expand(2, -1, -1, -1, -1))
    assert batched.shape == (2, g**3) and torch.equal(batched[1], out.abnormal)


def test_same_seed_same_lesions_other_seed_other_lesions(volume):
    t = RandSyntheticLesiond(keys="image")
    # As in MONAI, a Compose built after set_determinism seeds its random transforms.
    set_determinism(seed=7)
    a = Compose([RandSyntheticLesiond(keys="image")])({"image": volume})
    set_determinism(seed=7)
    b = Compose([RandSyntheticLesiond(keys="image")])({"image": volume})
    set_determinism(seed=8)
    c = Compose([RandSyntheticLesiond(keys="image")])({"image": volume})
    set_determinism(None)
    assert torch.equal(a["image_lesion_map"], b["image_lesion_map"])
    assert not torch.equal(a["image_lesion_map"], c["image_lesion_map"])
    d1 = t.set_random_state(11)({"image": volume})
    d2 = t.set_random_state(11)({"image": volume})
    assert torch.equal(d1["image_lesioned"], d2["image_lesioned"])
    assert d1["image"] is volume  # the clean target stays under the key
    assert set(d1) == {"image", "image_lesioned", "image_lesion_map", "image_abnormal"}


@pytest.mark.parametrize("polarity,sign", [("hyperdense", 1.0), ("hypodense", -1.0)])
def test_the_clip_touches_lesion_voxels_only(volume, polarity, sign):
    bright = volume.clone()
    bright[:, ::2] = torch.where(bright[:, ::2] > 0, 1.0, 0.0)  # half the body saturated, as bone in the CT window
    t = RandSyntheticLesion(polarity=polarity)
    for seed in range(4):
        t.set_random_state(seed)
        out = t(bright)
        lesion = out.lesion_map > 0
        normal = ~lesion
        assert bool(lesion.any()) and bool((bright[normal] > 0.92).any())
        assert torch.equal(out.lesioned[normal], bright[normal])  # bit for bit, bright voxels included
        expected = (bright + sign * out.lesion_map).clamp(0.0, 0.92)
        assert torch.equal(out.lesioned[lesion], expected[lesion])


def test_hypodense_subtracts_and_prob_zero_adds_nothing(volume):
    t = RandSyntheticLesion(polarity="hypodense")
    t.set_random_state(5)
    out = t(volume)
    m = out.lesion_map
    torch.testing.assert_close(out.lesioned, torch.where(m > 0, (volume - m).clamp(0.0, 0.92), volume))
    assert float(out.lesion_map.max()) > 0
    none = RandSyntheticLesion(prob=0.0)(volume)
    assert float(none.lesion_map.abs().max()) == 0.0 and not bool(none.abnormal.any())


@pytest.mark.parametrize(
    "kwargs",
    [{"num_lesions": (0, 2)}, {"extent_fraction": (0.5, 0.2)}, {"polarity": "iso"}, {"max_strength": -1.0}],
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        RandSyntheticLesion(**kwargs)


def test_side_not_divisible_by_patch_raises():
    with pytest.raises(ValueError, match="divisible"):
        RandSyntheticLesion()(torch.rand(1, 40, 32, 32))
