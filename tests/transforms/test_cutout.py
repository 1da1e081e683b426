import numpy as np
import pytest
import torch

from medssl3d.transforms.cutout import RandCutout, RandCutoutd


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
