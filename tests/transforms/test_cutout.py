import numpy as np
import pytest
import torch

from medssl3d.transforms.cutout import CutoutBoxes, RandBatchPaste, RandCutout, RandCutoutd


def _image(shape=(1, 32, 32, 32)):
    # A smooth ramp in (0.25, 0.75): noise in [0, 1] almost surely differs from it where it is written.
    grid = torch.meshgrid(*[torch.linspace(0, 1, s) for s in shape[1:]], indexing="ij")
    return (0.25 + 0.5 * sum(grid) / 3).expand(shape).clone()


def _union_of_boxes(boxes, shape):
    mask = np.zeros(shape, dtype=bool)
    for (z0, z1), (y0, y1), (x0, x1) in boxes:
        mask[z0:z1, y0:y1, x0:x1] = True
    return mask


@pytest.mark.parametrize("fill", ["noise", "zero"])
def test_fraction_bounded_and_only_boxes_changed(fill):
    t = RandCutout(fill=fill)
    t.set_random_state(seed=0)
    img = _image()
    orig = img.clone()
    fractions = []
    for _ in range(25):
        out = t(img)
        fractions.append(t.fraction)
        assert 0 < t.fraction <= 0.3
        # The vectorised mask is exactly the union of the reported boxes (a plain loop rebuilds it).
        np.testing.assert_array_equal(t.mask, _union_of_boxes(t.boxes, img.shape[1:]))
        assert t.fraction == pytest.approx(t.mask.mean())
        changed = (out != img)[0].numpy()
        np.testing.assert_array_equal(changed, t.mask)  # every box voxel changed, nothing outside
        if fill == "zero":
            assert torch.all(out[0][torch.from_numpy(t.mask)] == 0)
        else:
            vals = out[0][torch.from_numpy(t.mask)]
            assert vals.min() >= 0 and vals.max() <= 1
    torch.testing.assert_close(img, orig, rtol=0, atol=0)  # the input is never modified
    assert max(fractions) > 0.2 and min(fractions) < 0.1  # the drawn targets span the range


def test_tiny_cap_still_respected():
    t = RandCutout(max_fraction=0.02, max_block=0.2)
    t.set_random_state(seed=1)
    for _ in range(10):
        t(_image((1, 16, 24, 20)))
        assert 0 < t.fraction <= 0.02


def test_dict_twin_keeps_target_and_reports_fraction():
    t = RandCutoutd(keys="view", mask_postfix="_mask")
    t.set_random_state(seed=2)
    img = _image((1, 16, 16, 16))
    d = t({"view": img})
    assert d["view"] is img  # the undistorted target stays under its key
    frac = float(d["view_cutout_fraction"])
    mask = d["view_mask"]
    assert mask.shape == img.shape and 0 < frac <= 0.3
    assert frac == pytest.approx(mask.float().mean().item())
    torch.testing.assert_close(d["view_cutout"][~mask], img[~mask], rtol=0, atol=0)
    assert torch.all(d["view_cutout"][mask] != img[mask])


def test_same_seed_same_cutout():
    img = _image((1, 16, 16, 16))
    a, b = RandCutout(), RandCutout()
    a.set_random_state(seed=5)
    b.set_random_state(seed=5)
    torch.testing.assert_close(a(img), b(img), rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_fraction": 0},
        {"max_fraction": 1.5},
        {"min_fraction": 0.5},
        {"min_block": 0.3},
        {"max_boxes": 0},
        {"fill": "mean"},
    ],
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        RandCutout(**kwargs)


def test_box_larger_than_cap_raises():
    with pytest.raises(ValueError, match="max_block"):
        RandCutout(max_fraction=0.01, max_block=0.5)(_image((1, 8, 8, 8)))


def _boxes_by_hand(seed, shape, max_fraction, min_fraction, min_block=0.05, max_block=0.25, n=128):
    """CutoutBoxes' draws, then the shortest prefix reaching the target, less a box that passes the cap."""
    rng = np.random.RandomState(seed)
    target = rng.uniform(min_fraction, max_fraction)
    sizes = np.asarray(shape)
    sides = np.clip(np.floor(rng.uniform(min_block, max_block, size=(n, 3)) * sizes), 1, sizes).astype(int)
    starts = np.floor(rng.uniform(size=sides.shape) * (sizes - sides + 1)).astype(int)
    boxes = np.stack([starts, starts + sides], axis=-1)
    coverage = [_union_of_boxes(boxes[:k], shape).mean() for k in range(1, n + 1)]
    k_target = next((k for k, c in enumerate(coverage, 1) if c >= target), n)
    k_cap = sum(c <= max_fraction for c in coverage)
    k = min(k_target, k_cap)
    return boxes[:k], _union_of_boxes(boxes[:k], shape), target


@pytest.mark.parametrize("max_fraction, min_fraction", [(0.3, 0.0), (0.1, 0.1)])
def test_boxes_are_the_shortest_prefix_reaching_the_target_within_the_cap(max_fraction, min_fraction):
    # With the target at the cap (second case) the box reaching it nearly always overshoots and is dropped.
    shape = (16, 20, 12)
    sampler = CutoutBoxes(max_fraction=max_fraction, min_fraction=min_fraction)
    below_target = 0
    for seed in range(6):
        boxes, mask, fraction = sampler.draw(np.random.RandomState(seed), shape)
        want_boxes, want_mask, target = _boxes_by_hand(seed, shape, max_fraction, min_fraction)
        np.testing.assert_array_equal(boxes, want_boxes)
        np.testing.assert_array_equal(mask, want_mask)
        assert fraction == pytest.approx(want_mask.mean()) and fraction <= max_fraction
        below_target += fraction < target
    if min_fraction == max_fraction:
        assert below_target >= 4  # (a union may land exactly on the target)


def _batch(b=4, shape=(1, 16, 16, 16)):
    # Sample i is the constant i + 1: any pasted voxel shows which sample it came from.
    return torch.arange(1, b + 1, dtype=torch.float32).view(b, 1, 1, 1, 1).expand(b, *shape).clone()


def test_batch_paste_copies_boxes_of_the_drawn_partner():
    img = _batch()
    source = 10 * img  # partner j shows as 10 (j + 1)
    t = RandBatchPaste()
    t.set_random_state(seed=0)
    partners = []
    for _ in range(20):
        out = t(img, source)
        for i, j in enumerate(t.partners.tolist()):
            mask = torch.from_numpy(t.masks[i])
            if j == i:
                assert not mask.any() and t.fractions[i] == 0
            else:
                assert 0 < t.fractions[i] <= 0.3 and mask.float().mean().item() == pytest.approx(t.fractions[i])
            # Inside the mask: the partner's source voxels; outside: the sample itself.
            assert torch.all(out[i][:, mask] == 10 * (j + 1)) and torch.all(out[i][:, ~mask] == i + 1)
            partners.append((i, j))
    assert torch.equal(img, _batch())  # the input is not modified
    # Partners are uniform over the batch, the sample itself included (then nothing is pasted).
    counts = np.bincount([j for _, j in partners], minlength=4)
    assert counts.min() > 8 and sum(i == j for i, j in partners) < 40


def test_batch_paste_of_one_sample_changes_nothing_and_repeats_with_a_seed():
    t = RandBatchPaste()
    t.set_random_state(seed=1)
    torch.testing.assert_close(t(_batch(1), 2 * _batch(1)), _batch(1), rtol=0, atol=0)
    a, b = RandBatchPaste(), RandBatchPaste()
    a.set_random_state(seed=3)
    b.set_random_state(seed=3)
    torch.testing.assert_close(a(_batch(), 10 * _batch()), b(_batch(), 10 * _batch()), rtol=0, atol=0)


def test_batch_paste_shape_mismatch_raises():
    with pytest.raises(ValueError, match="source"):
        RandBatchPaste()(_batch(2), _batch(3))
