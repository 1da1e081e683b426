import logging

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, OneOf, RandFlipd, RandGaussianNoised, RandSpatialCropd, RandZoomd

from medssl3d.data.phantoms import make_phantom, write_nifti
from medssl3d.transforms.alignment import (
    ForegroundExtentCheckd,
    RegisterToTemplated,
    alignment_transforms,
    check_no_spatial_augmentation,
)
from medssl3d.transforms.rotation import RandRotate90Classd


def _volume(shape=(48, 40, 56), pad=6):
    # A bright box (the "body") inside zero background; its box is known.
    x = torch.zeros(1, *shape)
    x[:, pad:-pad, pad + 2 : -pad, pad : -pad - 4] = 0.5
    return MetaTensor(x, affine=torch.diag(torch.tensor([1.5, 1.5, 1.5, 1.0], dtype=torch.float64)))


def test_crop_and_resize_to_the_fixed_grid_and_invert():
    t = alignment_transforms(("image", "label"), size=32)
    vol = _volume()
    label = MetaTensor((vol > 0).float(), affine=vol.affine)
    out = t({"image": vol, "label": label})
    assert out["image"].shape == out["label"].shape == (1, 32, 32, 32)
    # The foreground box fills the grid: no background row survives the crop.
    assert float(out["image"][0, 0].min()) > 0.4 and float(out["image"][0, :, :, -1].min()) > 0.4
    assert set(torch.unique(out["label"]).tolist()) == {1.0}
    back = t.inverse(out)["image"]
    assert back.shape == vol.shape
    torch.testing.assert_close(back.affine, vol.affine)
    inside = vol[0] > 0
    assert float((back[0][inside] - 0.5).abs().max()) < 1e-4 and float(back[0][~inside].abs().max()) == 0.0


def _phantom_case(name, shape, spacing=2.0):
    phantom = make_phantom(shape=shape, spacing=(spacing,) * 3, seed=0)
    image = np.clip((phantom.image + 125.0) / 350.0, 0, 1).astype(np.float32)
    affine = torch.as_tensor(phantom.affine)
    return MetaTensor(torch.from_numpy(image)[None], affine=affine, meta={"filename_or_obj": name})


def test_alignment_without_template_warns_about_a_case_of_other_extent(caplog):
    t = alignment_transforms(size=32)  # default tolerance 0.25
    chest = _phantom_case("chest.nii.gz", (48, 48, 48))
    body = _phantom_case("whole_body.nii.gz", (48, 48, 96))  # twice the inferior-superior coverage
    with caplog.at_level(logging.WARNING, logger="medssl3d.transforms.alignment"):
        t({"image": chest})
        t({"image": chest})
        assert not caplog.records  # one case, and the same case again: nothing to compare
        out = t({"image": body})["image"]
    assert out.shape == (1, 32, 32, 32)
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    check = t.transforms[-1]
    chest_mm, body_mm = check.extents["chest.nii.gz"], check.extents["whole_body.nii.gz"]
    assert "whole_body.nii.gz" in message and "inferior-superior" in message and "left-right" not in message
    assert " x ".join(f"{e:.0f}" for e in body_mm) + " mm" in message
    assert " x ".join(f"{e:.0f}" for e in chest_mm) + " mm" in message
    # The extents are the foreground boxes in mm: the body spans about twice the chest along the last axis.
    assert 1.7 < body_mm[2] / chest_mm[2] < 2.3 and abs(body_mm[0] - chest_mm[0]) < 4.0


def test_extent_check_is_quiet_within_tolerance_with_a_template_or_when_off(caplog):
    a, b = _phantom_case("a.nii.gz", (48, 48, 48)), _phantom_case("b.nii.gz", (48, 48, 54))
    with caplog.at_level(logging.WARNING, logger="medssl3d.transforms.alignment"):
        t = alignment_transforms(size=32)
        t({"image": a}), t({"image": b})  # within 25 %
        off = alignment_transforms(size=32, extent_tolerance=None)
        assert not any(isinstance(s, ForegroundExtentCheckd) for s in off.transforms)
        strict = alignment_transforms(size=32, extent_tolerance=0.05)
        strict({"image": a}), strict({"image": b})
    assert len(caplog.records) == 1 and "box of b.nii.gz is" in caplog.records[0].getMessage()  # only the strict one
    with pytest.raises(ValueError, match="tolerance"):
        ForegroundExtentCheckd("image", tolerance=0.0)


def test_guard_names_the_spatial_augmentations():
    ok = Compose([RandGaussianNoised("image", prob=1.0), alignment_transforms(size=16)])
    assert check_no_spatial_augmentation(ok) is ok
    bad = Compose(
        [
            RandGaussianNoised("image"),
            OneOf([RandFlipd("image"), RandZoomd("image")]),
            Compose([RandSpatialCropd("image", roi_size=8), RandRotate90Classd("image", label_key="r")]),
        ]
    )
    with pytest.raises(ValueError) as err:
        check_no_spatial_augmentation(bad)
    for name in ("RandFlipd", "RandZoomd", "RandSpatialCropd", "RandRotate90Classd"):
        assert name in str(err.value)
    assert "RandGaussianNoised" not in str(err.value)


def test_registration_recovers_a_shift_and_inverts(tmp_path):
    phantom = make_phantom(shape=(48, 48, 48), spacing=(2.0, 2.0, 2.0), seed=0, deform=False)
    image = np.clip((phantom.image + 200) / 500, 0, 1).astype(np.float32)
    template = write_nifti(image, phantom.affine, tmp_path / "template.nii.gz")
    # The same anatomy, its voxels shifted by 4 voxels along z (8 mm) on the same grid.
    shifted = np.zeros_like(image)
    shifted[4:] = image[:-4]
    moving = MetaTensor(torch.from_numpy(shifted)[None], affine=torch.as_tensor(phantom.affine))
    reg = RegisterToTemplated("image", template, cache_dir=tmp_path / "cache")
    out = reg({"image": moving})["image"]
    assert out.shape == (1, 48, 48, 48)
    assert len(list((tmp_path / "cache").iterdir())) == 1  # the case transform is cached on disk
    # Output voxel t shows case voxel t + (4, 0, 0): its affine says so, within 1.5 mm (voxels are 2 mm).
    expected = phantom.affine @ np.array([[1, 0, 0, 4], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    np.testing.assert_allclose(out.affine.numpy(), expected, atol=1.5)
    inner = (slice(8, -8),) * 3
    before = np.abs(shifted - image)[inner].mean()
    after = np.abs(out[0].numpy() - image)[inner].mean()
    assert after < 0.35 * before
    back = reg.inverse({"image": out})["image"]
    np.testing.assert_allclose(back.affine.numpy(), phantom.affine, atol=1e-6)
    assert back.shape == moving.shape
    assert np.abs(back[0].numpy() - shifted)[inner].mean() < 0.35 * before


def test_bad_arguments_raise(tmp_path):
    with pytest.raises(ValueError, match="size"):
        alignment_transforms(size=0)
    with pytest.raises(ValueError, match="coarse_spacing"):
        RegisterToTemplated("image", tmp_path / "t.nii.gz", coarse_spacing=0)
    reg = RegisterToTemplated("image", tmp_path / "missing.nii.gz")
    with pytest.raises(ValueError, match="missing.nii.gz"):
        reg({"image": _volume()})
