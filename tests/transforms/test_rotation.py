import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset
from monai.transforms import Compose
from monai.utils import set_determinism

from medssl3d.transforms.rotation import RandRotate90Class, RandRotate90Classd, rotate90


def _volume(shape=(1, 6, 8, 8)):
    # Distinct values everywhere, so any permutation of voxels is detected.
    return torch.arange(int(np.prod(shape)), dtype=torch.float32).reshape(shape)


def test_rotating_back_by_the_drawn_class_gives_the_original():
    t = RandRotate90Class()
    t.set_random_state(seed=3)
    img = _volume()
    seen = set()
    for _ in range(20):
        out = t(img)
        k = t.label
        seen.add(k)
        torch.testing.assert_close(rotate90(out, -k), img, rtol=0, atol=0)
        # The class is exactly the number of quarter turns in the A-S (sagittal) plane: tensor dims (2, 3)
        # of a (C, R, A, S) sample, as the original rot_rand.
        torch.testing.assert_close(out, torch.rot90(img, k, dims=(2, 3)), rtol=0, atol=0)
    assert seen == {0, 1, 2, 3}


def test_dict_twin_rotates_all_keys_together_and_stores_the_label():
    t = RandRotate90Classd(keys=("a", "b"), label_key="rot")
    t.set_random_state(seed=0)
    img = _volume()
    for _ in range(8):
        d = t({"a": img, "b": img * 2, "other": img})
        k = int(d["rot"])
        assert d["rot"].dtype == torch.long and d["rot"].ndim == 0
        torch.testing.assert_close(d["a"], torch.rot90(img, k, dims=(2, 3)), rtol=0, atol=0)
        torch.testing.assert_close(d["b"], 2 * d["a"], rtol=0, atol=0)
        assert d["other"] is img


def test_default_plane_is_sagittal_and_keeps_the_left_right_axis():
    # A box with extents (10, 10, 4) along (R, A, S): odd classes swap the A and S extents, R stays.
    img = torch.zeros(1, 12, 12, 12)
    img[0, 1:11, 1:11, 4:8] = 1
    t = RandRotate90Class()
    t.set_random_state(seed=3)
    for _ in range(12):
        out = t(img)
        extents = [int(out[0].any(dim=tuple(d for d in range(3) if d != a)).sum()) for a in range(3)]
        assert extents == ([10, 4, 10] if t.label % 2 else [10, 10, 4])


def test_labels_are_roughly_uniform():
    t = RandRotate90Class(num_classes=4)
    t.set_random_state(seed=1)
    n = 400
    counts = np.bincount([(t.randomize(), t.label)[1] for _ in range(n)], minlength=4)
    # Each class expects 100 draws (sd ~8.7); 60..140 is more than 4 sd either way.
    assert counts.sum() == n and counts.min() > 60 and counts.max() < 140


def test_num_classes_limits_the_labels():
    t = RandRotate90Class(num_classes=2)
    t.set_random_state(seed=0)
    assert {(t.randomize(), t.label)[1] for _ in range(50)} == {0, 1}


def _labels_through_loader(seed):
    set_determinism(seed=seed)
    t = Compose([RandRotate90Classd(keys="image", label_key="rot")])
    data = [{"image": _volume()} for _ in range(16)]
    loader = DataLoader(Dataset(data, transform=t), batch_size=4, num_workers=0)
    return torch.cat([b["rot"] for b in loader]).tolist()


def test_deterministic_under_set_determinism():
    try:
        first, second, other = _labels_through_loader(7), _labels_through_loader(7), _labels_through_loader(8)
    finally:
        set_determinism(seed=None)
    assert first == second
    assert first != other


@pytest.mark.parametrize(
    "kwargs", [{"num_classes": 0}, {"num_classes": 5}, {"spatial_axes": (1, 1)}, {"spatial_axes": (0, 1, 2)}]
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        RandRotate90Class(**kwargs)
