import pytest
import torch

from medssl3d.data.phantoms import make_phantom
from medssl3d.transforms.views import two_views


@pytest.fixture(scope="module")
def volume():
    image = torch.from_numpy(make_phantom(shape=(48, 40, 40), seed=0).image)[None]
    return (image - image.min()) / (image.max() - image.min())


def test_two_views_have_the_roi_and_differ_by_their_own_jitter(volume):
    t = two_views((32, 24, 24))
    t.set_random_state(seed=0)
    for _ in range(3):
        d = t({"image": volume})
        assert d["view1"].shape == d["view2"].shape == (1, 32, 24, 24)
        assert not torch.equal(d["view1"], d["view2"])
        assert d["image"].shape == volume.shape  # the source is kept


def test_views_are_copies_of_one_crop_without_jitter(volume):
    # No flips or intensity jitter: both views are the same sub-block of the volume.
    t = two_views((16, 16, 16), flip_prob=0.0, intensity_prob=0.0)
    t.set_random_state(seed=1)
    windows = volume.unfold(1, 16, 1).unfold(2, 16, 1).unfold(3, 16, 1)
    corners = set()
    for _ in range(4):
        d = t({"image": volume})
        torch.testing.assert_close(d["view1"], d["view2"], rtol=0, atol=0)
        hits = (windows == d["view1"][0]).flatten(-3).all(-1)[0]
        assert hits.any()
        corners.add(tuple(hits.nonzero()[0].tolist()))
    assert len(corners) > 1  # the crop itself is random


def test_independent_crops_are_each_a_sub_block(volume):
    t = two_views((16, 16, 16), independent_crops=True, flip_prob=0.0, intensity_prob=0.0)
    t.set_random_state(seed=1)
    windows = volume.unfold(1, 16, 1).unfold(2, 16, 1).unfold(3, 16, 1)
    same = 0
    for _ in range(4):
        d = t({"image": volume})
        for key in ("view1", "view2"):
            assert (windows == d[key][0]).flatten(-3).all(-1).any()
        same += torch.equal(d["view1"], d["view2"])
    assert same < 4


def test_small_volume_is_padded_to_the_roi():
    d = two_views((32, 32, 32))({"image": torch.rand(1, 20, 40, 30)})
    assert d["view1"].shape == (1, 32, 32, 32)


def test_seeded_views_repeat(volume):
    a, b = two_views((16, 16, 16)), two_views((16, 16, 16))
    a.set_random_state(seed=4)
    b.set_random_state(seed=4)
    torch.testing.assert_close(a({"image": volume})["view2"], b({"image": volume})["view2"])


@pytest.mark.parametrize(
    "kwargs", [{"roi_size": (0, 16, 16)}, {"view_keys": ("image", "v")}, {"view_keys": ()}]
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        two_views(**kwargs)
