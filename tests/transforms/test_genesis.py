import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.utils import set_determinism

from medssl3d.transforms.genesis import (
    RandBezierIntensity,
    RandBezierIntensityd,
    RandInPaint,
    RandInPaintd,
    RandLocalShuffle,
    RandLocalShuffled,
    RandOutPaint,
    RandOutPaintd,
    bezier_lookup,
    distortions,
    exclusive_distortions,
    genesis_distortions,
)

SHAPE = (1, 40, 36, 32)


def _volume(shape=SHAPE, seed=0):
    # distinct values, so that a change of place is a change of value
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g)


@pytest.mark.parametrize("seed", range(6))
def test_bezier_remap_is_monotone_and_maps_unit_interval_into_itself(seed):
    t = RandBezierIntensity(prob=1.0)
    t.set_random_state(seed)
    ramp = torch.linspace(0.0, 1.0, 2001).reshape(1, 1, 1, -1)
    out = t(ramp).reshape(-1)
    assert out.min() >= 0.0 and out.max() <= 1.0
    steps = out.diff()
    assert bool((steps >= -1e-7).all()) or bool((steps <= 1e-7).all())
    assert sorted([float(out[0]), float(out[-1])]) == pytest.approx([0.0, 1.0], abs=1e-6)  # ends to ends
    assert not torch.allclose(out, ramp.reshape(-1), atol=1e-3)  # non-linear (a.s.)


def test_bezier_curve_known_answer_and_both_directions():
    # Control points on the diagonal: the cubic Bézier is the identity.
    xs, ys = bezier_lookup([1 / 3, 2 / 3], [1 / 3, 2 / 3], n_samples=11)
    np.testing.assert_allclose(xs, np.linspace(0, 1, 11), atol=1e-12)
    np.testing.assert_allclose(ys, xs, atol=1e-12)
    _, inv = bezier_lookup([1 / 3, 2 / 3], [1 / 3, 2 / 3], n_samples=11, invert=True)
    np.testing.assert_allclose(inv, 1 - xs, atol=1e-12)
    directions = set()
    for seed in range(20):
        t = RandBezierIntensity(prob=1.0)
        t.set_random_state(seed)
        out = t(torch.tensor([[[[0.0, 1.0]]]])).reshape(-1)
        directions.add(bool(out[1] > out[0]))
    assert directions == {True, False}  # the Models-Genesis "flip" happens


def test_bezier_clamps_out_of_range_and_keeps_type_and_meta():
    t = RandBezierIntensity(prob=1.0)
    t.set_random_state(3)
    img = MetaTensor(torch.tensor([[[[-0.5, 0.0, 1.0, 1.7]]]]), affine=torch.eye(4) * 2)
    out = t(img)
    assert isinstance(out, MetaTensor) and torch.equal(out.affine, img.affine)
    assert out[0, 0, 0, 0] == out[0, 0, 0, 1] and out[0, 0, 0, 2] == out[0, 0, 0, 3]
    arr = t(np.full((1, 2, 2, 2), 0.5, dtype=np.float32), randomize=False)
    assert isinstance(arr, np.ndarray) and arr.dtype == np.float32


def test_probability_zero_returns_input_unchanged():
    x = _volume()
    for t in (RandBezierIntensity(prob=0.0), RandLocalShuffle(prob=0.0), RandInPaint(prob=0.0), RandOutPaint(prob=0.0)):
        assert torch.equal(t(x), x)


@pytest.mark.parametrize("seed", range(4))
def test_shuffling_preserves_the_multiset_inside_each_cube_and_nothing_else_moves(seed):
    x = torch.cat([_volume(seed=seed), _volume(seed=seed) * 10])  # two channels, one permutation
    t = RandLocalShuffle(prob=1.0)
    t.set_random_state(seed)
    out = t(x)
    assert t.selected.any()
    # Label every voxel with its cube's index (-1: not shuffled), built by integer arithmetic.
    grids = np.meshgrid(*[np.arange(s) for s in x.shape[1:]], indexing="ij")
    cell = [(g - o) // c for g, o, c in zip(grids, t.offset, t.cube, strict=True)]
    inside = np.logical_and.reduce([(k >= 0) & (k < n) for k, n in zip(cell, t.selected.shape, strict=True)])
    clipped = [np.clip(k, 0, n - 1) for k, n in zip(cell, t.selected.shape, strict=True)]
    label = np.where(inside & t.selected[tuple(clipped)], np.ravel_multi_index(clipped, t.selected.shape), -1)
    for c in range(x.shape[0]):  # per cube, the sorted values before and after agree
        before, after = x[c].numpy().ravel(), out[c].numpy().ravel()
        np.testing.assert_array_equal(before[np.lexsort((before, label.ravel()))],
                                      after[np.lexsort((after, label.ravel()))])
    torch.testing.assert_close(out[1], out[0] * 10)  # same permutation for every channel
    changed = torch.from_numpy(label >= 0)
    assert torch.equal(out[:, ~changed], x[:, ~changed])
    assert bool((out[:, changed] != x[:, changed]).any())
    assert not torch.equal(out, x)


def test_shuffled_cubes_are_small():
    t = RandLocalShuffle(prob=1.0)
    for seed in range(10):
        t.set_random_state(seed)
        t.randomize((64, 64, 32))
        assert all(1 <= c <= m for c, m in zip(t.cube, (6, 6, 3), strict=True))


@pytest.mark.parametrize("seed", range(4))
def test_in_painting_changes_only_the_drawn_boxes(seed):
    x = _volume(seed=seed)
    t = RandInPaint()
    t.set_random_state(seed)
    out = t(x)
    mask = torch.from_numpy(t.mask)
    assert 1 <= len(t.boxes) <= 5 and mask.any() and not mask.all()
    assert torch.equal(out[:, ~mask], x[:, ~mask])
    assert bool((out[:, mask] != x[:, mask]).all())
    assert out.min() >= 0 and out.max() <= 1
    sizes = np.asarray(SHAPE[1:])
    sides = t.boxes[..., 1] - t.boxes[..., 0]
    assert (sides >= np.round(sizes / 6)).all() and (sides <= np.round(sizes / 3)).all()
    assert (t.boxes[..., 0] >= 3).all() and (t.boxes[..., 1] <= sizes - 3).all()


@pytest.mark.parametrize("seed", range(4))
def test_out_painting_changes_only_outside_the_drawn_boxes(seed):
    x = _volume(seed=seed)
    t = RandOutPaint()
    t.set_random_state(seed)
    out = t(x)
    keep = torch.from_numpy(t.mask)
    assert keep.any() and not keep.all()
    assert torch.equal(out[:, keep], x[:, keep])
    assert bool((out[:, ~keep] != x[:, ~keep]).all())


@pytest.mark.parametrize(
    "make", [RandBezierIntensityd, RandLocalShuffled, RandInPaintd, RandOutPaintd], ids=lambda c: c.__name__
)
def test_dict_twins_leave_the_target_untouched_and_draw_once_for_all_keys(make):
    x = _volume()
    target = x.clone()
    t = make(keys=("image", "other"), prob=1.0) if make is not RandInPaintd else make(keys=("image", "other"))
    t.set_random_state(1)
    data = {"image": x, "other": x.clone(), "target": target}
    out = t(data)
    assert out["target"] is target and torch.equal(target, x)  # untouched
    assert torch.equal(data["image"], x)  # the input dict's tensors are not modified in place
    assert not torch.equal(out["image"], x)
    assert torch.equal(out["image"], out["other"])  # one draw, every key


def test_chain_is_reproducible_and_uses_the_documented_probabilities():
    chain = genesis_distortions("image")
    x = _volume()
    chain.set_random_state(7)
    a = chain({"image": x})["image"]
    chain.set_random_state(7)
    b = chain({"image": x})["image"]
    assert torch.equal(a, b)
    set_determinism(0)
    try:
        c = genesis_distortions("image")({"image": x})["image"]
        set_determinism(0)
        d = genesis_distortions("image")({"image": x})["image"]
    finally:
        set_determinism(None)
    assert torch.equal(c, d)
    bezier, shuffle, paint = genesis_distortions("image").transforms
    assert bezier.transform.prob == 0.9 and shuffle.transform.prob == 0.5
    np.testing.assert_allclose(paint.weights, [0.9 * 0.2, 0.9 * 0.8, 0.1])


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="invert_prob"):
        RandBezierIntensity(invert_prob=2.0)
    with pytest.raises(ValueError, match="max_cube"):
        RandLocalShuffle(max_cube=0.0)
    with pytest.raises(ValueError, match="max_boxes"):
        RandInPaint(max_boxes=0)
    with pytest.raises(ValueError, match="paint_prob"):
        genesis_distortions("image", paint_prob=1.5)
    with pytest.raises(ValueError, match="must be <= 1"):
        exclusive_distortions("image", inpaint_prob=0.6, shuffle_prob=0.6)
    with pytest.raises(ValueError, match="'mild'"):
        distortions("mild", "image")


def test_local_shuffle_with_one_voxel_thick_cubes_keeps_the_voxels():
    # seed 40 draws a (c, 1, 1) cube at 64^3, whose reshaped block is a view of the output itself
    t = RandLocalShuffle(prob=1.0)
    t.set_random_state(40)
    img = torch.rand(1, 64, 64, 64)
    out = t(img)
    assert torch.equal(out.flatten().sort().values, img.flatten().sort().values)


def test_exclusive_mix_applies_exactly_one_distortion_with_the_official_probabilities():
    mix = distortions("exclusive", "image")
    assert [type(t).__name__ for t in mix.transforms] == ["RandInPaintd", "RandOutPaintd", "RandLocalShuffled",
                                                         "Identityd"]
    np.testing.assert_allclose(mix.weights, [0.30, 0.05, 0.30, 0.35])
    mix.set_random_state(0)
    x = _volume((1, 32, 32, 32))
    kinds = []
    for _ in range(300):
        out = mix({"image": x})["image"]
        if torch.equal(out, x):
            kinds.append("none")  # never an intensity remap: an undistorted view is the view itself
        elif torch.equal(out.flatten().sort().values, x.flatten().sort().values):
            kinds.append("shuffle")  # a permutation only: no painting on top
        else:  # boxes keep 3 voxels from the border: only out-painting changes the corner voxel
            kinds.append("outpaint" if out[0, 0, 0, 0] != x[0, 0, 0, 0] else "inpaint")
    freq = {k: kinds.count(k) / len(kinds) for k in ("inpaint", "outpaint", "shuffle", "none")}
    for kind, p in zip(freq, (0.30, 0.05, 0.30, 0.35), strict=True):
        assert abs(freq[kind] - p) < 0.07, freq


def test_named_mixes_take_their_probabilities():
    genesis = distortions("genesis", "image", bezier_prob=0.25)
    assert genesis.transforms[0].transform.prob == 0.25
    np.testing.assert_allclose(distortions("exclusive", "image", shuffle_prob=0.5).weights, [0.3, 0.05, 0.5, 0.15])
