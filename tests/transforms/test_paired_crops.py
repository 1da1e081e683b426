import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medssl3d.data.phantoms import make_phantom
from medssl3d.transforms.correspondence import BodyBoxProvider, CorrespondenceProvider
from medssl3d.transforms.paired_crops import (
    PairedDataset,
    RandCorrespondingCropsd,
    build_provider,
    crop_around,
)

ROI = (32, 32, 32)


def _image(shape=(40, 40, 40), seed=0, origin=(0.0, 0.0, 0.0), pad=None):
    array = make_phantom(shape=shape, seed=seed).image
    array = np.clip((array + 125.0) / 350.0, 0.0, 1.0).astype(np.float32)
    if pad is not None:
        array = np.pad(array, [(p, 0) for p in pad])
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    affine[:3, 3] = origin
    return MetaTensor(torch.from_numpy(array)[None], affine=torch.as_tensor(affine))


class ScriptedProvider(CorrespondenceProvider):
    """Returns p unchanged with scores from a list (for the retry loop)."""

    name = "scripted"

    def __init__(self, scores):
        self.scores = list(scores)
        self.calls = 0
        self.points = []

    def __call__(self, vol_q, vol_k, p):
        self.calls += 1
        self.points.append(p)
        return np.asarray(p) + self.calls, self.scores[self.calls - 1]


def test_matched_crops_cover_the_same_physical_extent_and_content():
    q = _image()
    k = _image(pad=(5, 3, 7), origin=(-20.0, 10.0, 4.0))  # Q shifted inside a larger K
    crops = RandCorrespondingCropsd(BodyBoxProvider(crop_size=ROI), ROI, keep_points=True).set_random_state(seed=0)
    out = crops({"image": q, "image_k": k})
    np.testing.assert_allclose(out["pair_point_k"] - out["pair_point_q"], [5, 3, 7])
    assert torch.equal(out["view_q"].as_tensor(), out["view_k"].as_tensor())
    for v in ("view_q", "view_k"):
        spacing = torch.linalg.norm(out[v].affine[:3, :3], dim=0)
        torch.testing.assert_close(spacing * torch.tensor(ROI), torch.full((3,), 48.0, dtype=spacing.dtype))
    # the crops' voxel 0 sits at the physical position of its source voxel
    start_q = out["pair_point_q"].round() - 16
    expected = q.affine[:3, :3] @ start_q.double() + q.affine[:3, 3]
    torch.testing.assert_close(out["view_q"].affine[:3, 3], expected)


def test_padding_at_borders_is_on_the_right_side():
    image = _image()
    vol = image[0].numpy()
    crop = crop_around(image, np.array([3.0, 38.0, 20.0]), ROI, fill=-1.0)[0]
    # the box is [-13, 19) x [22, 54) x [4, 36): 13 rows before axis 0 and 14 after axis 1 are padding
    assert (crop[:13] == -1).all() and (crop[:, 18:] == -1).all()
    assert torch.equal(crop[13:, :18].as_tensor(), torch.from_numpy(vol[:19, 22:40, 4:36]))


def test_retry_loop_accepts_at_threshold_else_takes_the_best():
    image = _image()
    provider = ScriptedProvider([0.1, 0.5, 0.75, 0.9])
    out = RandCorrespondingCropsd(provider, ROI, threshold=0.7).set_random_state(seed=0)({"image": image,
                                                                                         "image_k": image})
    assert out["pair_accepted"] == 1 and out["pair_tries"] == 3 and out["pair_score"] == pytest.approx(0.75)
    provider = ScriptedProvider([0.2, 0.6, 0.3])
    crops = RandCorrespondingCropsd(provider, ROI, threshold=0.7, max_tries=3, keep_points=True)
    out = crops.set_random_state(seed=0)({"image": image, "image_k": image})
    assert out["pair_accepted"] == 0 and out["pair_tries"] == 3 and out["pair_score"] == pytest.approx(0.6)
    np.testing.assert_allclose(out["pair_point_k"] - out["pair_point_q"], [2, 2, 2])  # the second pair


def test_points_are_drawn_in_the_foreground():
    image = _image()
    provider = ScriptedProvider([0.0] * 50)
    crops = RandCorrespondingCropsd(provider, ROI, max_tries=50, foreground_threshold=0.3)
    crops.set_random_state(seed=0)({"image": image, "image_k": image})
    vol = image[0].numpy()
    assert len(provider.points) == 50 and all(vol[tuple(p.astype(int))] > 0.3 for p in provider.points)


def test_paired_dataset_draws_another_case_reproducibly():
    volumes = [{"image": _image(seed=i) + i} for i in range(3)]  # + i: tell the cases apart by value
    def identity(d):
        return {"q": float(d["image"].min()), "k": float(d["image_k"].min())}

    ds = PairedDataset(volumes, identity)
    draws = []
    for seed in (0, 0, 1):
        ds.transform.set_random_state(seed=seed)
        draws.append([ds[i] for i in range(3)])
    assert draws[0] == draws[1]
    assert all(item["q"] == i and item["k"] != i for i, item in enumerate(draws[0]))
    single = PairedDataset(volumes, lambda d: sorted(d), pair=False)
    assert single[0] == ["image"]


def test_build_provider_names_and_errors():
    assert build_provider("same_volume", roi_size=ROI).needs_key_volume is False
    assert build_provider("feature", roi_size=ROI).fallback.name == "body_box"
    # the body threshold reaches every provider that scores or centres over the body
    template = _image(shape=(16, 16, 16))
    for name in ("body_box", "registration", "feature"):
        provider = build_provider(name, roi_size=ROI, foreground_threshold=0.4, template=template)
        assert provider.foreground_threshold == 0.4, name
    with pytest.raises(ValueError, match="template"):
        build_provider("registration")
    with pytest.raises(ValueError, match="unknown"):
        build_provider("sift")
