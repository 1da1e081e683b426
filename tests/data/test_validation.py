import logging

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medssl3d.data.errors import InputError
from medssl3d.data.phantoms import make_phantom, write_nifti
from medssl3d.data.readers import read_header, volume_loader
from medssl3d.data.validation import ValidateVolumed, check_same_grid, check_volume, select_volume


def _load(path, **kwargs):
    return volume_loader("image", **kwargs)({"image": str(path)})["image"]


def _raises_naming(path, match, call):
    with pytest.raises(InputError, match=match) as err:
        call()
    assert str(path) in str(err.value)
    return str(err.value)


def test_missing_file(tmp_path):
    path = tmp_path / "a.nii.gz"
    _raises_naming(path, "not found", lambda: _load(path))
    _raises_naming(path, "not found", lambda: read_header(path))


@pytest.mark.parametrize("name", ["a.nii.gz", "a.nii"])
def test_truncated_nifti(tmp_path, name):
    phantom = make_phantom(shape=(32,) * 3)
    path = write_nifti(phantom.image, phantom.affine, tmp_path / name)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _raises_naming(path, "corrupt or truncated", lambda: _load(path))
    _raises_naming(path, "corrupt or truncated", lambda: read_header(path))


def test_garbage_nifti(tmp_path):
    path = tmp_path / "junk.nii.gz"
    path.write_bytes(b"this is not a nifti file" * 20)
    _raises_naming(path, "corrupt or truncated", lambda: _load(path))
    _raises_naming(path, "corrupt or truncated", lambda: read_header(path))


def test_multi_member_gzip_is_not_mistaken_for_truncation(tmp_path):
    import gzip

    phantom = make_phantom(shape=(16,) * 3)
    plain = write_nifti(phantom.image, phantom.affine, tmp_path / "a.nii").read_bytes()
    path = tmp_path / "multi.nii.gz"
    path.write_bytes(gzip.compress(plain[:1000]) + gzip.compress(plain[1000:]))
    assert read_header(path).shape == (16, 16, 16)
    assert torch.equal(_load(path)[0], torch.from_numpy(phantom.image))


def test_2d_image(tmp_path):
    path = write_nifti(np.zeros((64, 64), np.float32), np.eye(4), tmp_path / "a.nii.gz")
    message = _raises_naming(path, "2D", lambda: _load(path))
    assert message == f"{path}: image is 2D (shape (64, 64)); a 3D volume is expected"
    single_slice = write_nifti(np.zeros((64, 64, 1), np.float32), np.eye(4), tmp_path / "b.nii.gz")
    _raises_naming(single_slice, r"image is 2D \(shape \(64, 64, 1\)\)", lambda: _load(single_slice))


def test_4d_image_is_an_error_unless_a_volume_is_chosen(tmp_path, caplog):
    volumes = np.stack([np.full((24, 20, 16), v, np.float32) for v in (10, 20, 30)], axis=-1)
    path = write_nifti(volumes, np.eye(4), tmp_path / "dwi.nii.gz")
    message = _raises_naming(path, "4D", lambda: _load(path))
    assert "3 volumes" in message and "allow_4d_index" in message
    with caplog.at_level(logging.INFO, logger="medssl3d.data.validation"):
        loaded = _load(path, allow_4d_index=1)
    assert loaded.shape == (1, 24, 20, 16) and torch.all(loaded == 20)
    assert "taking volume index 1 of 3 volumes" in caplog.text and str(path) in caplog.text
    assert torch.all(_load(path, allow_4d_index=-1) == 30)
    _raises_naming(path, "out of range", lambda: _load(path, allow_4d_index=3))
    # a 4D file holding a single volume is a 3D volume
    one = write_nifti(volumes[..., :1], np.eye(4), tmp_path / "one.nii.gz")
    assert _load(one).shape == (1, 24, 20, 16)


def test_nan_and_inf_voxels(tmp_path):
    image = make_phantom(shape=(32,) * 3).image
    image[3, 4, 5], image[6, 7, 8], image[9, 9, 9] = np.nan, np.nan, np.inf
    path = write_nifti(image, np.eye(4), tmp_path / "nan.nii.gz")
    data = volume_loader("image")({"image": str(path)})
    message = _raises_naming(path, "NaN", lambda: ValidateVolumed("image")(data))
    assert "2 NaN and 1 infinite voxel(s)" in message
    with pytest.raises(InputError, match="0 NaN and 1 infinite"):
        check_volume(np.where(np.isnan(image), 0, image), path)


def test_volume_smaller_than_the_crop(tmp_path, nifti_case):
    case = nifti_case(with_label=False)  # 48 x 48 x 32
    data = volume_loader("image")(case)
    assert ValidateVolumed("image", min_shape=(32, 32, 32))(data)["image"] is data["image"]
    message = _raises_naming(
        case["image"], "smaller", lambda: ValidateVolumed("image", min_shape=(96, 96, 96))(data)
    )
    assert "(48, 48, 32)" in message and "(96, 96, 96)" in message
    with pytest.raises(InputError, match="smaller"):
        check_volume(np.zeros((48, 48, 32)), "x.nii.gz", min_shape=40)


def test_label_grid_differs_from_its_image(tmp_path, nifti_case):
    case = nifti_case()
    image = read_header(case["image"])
    check_same_grid(image, read_header(case["label"]))  # written together: same grid

    phantom = make_phantom(shape=(48, 48, 32))
    moved = phantom.affine.copy()
    moved[:3, 3] += 0.5
    shifted = write_nifti(phantom.label, moved, tmp_path / "shifted_seg.nii.gz")
    message = _raises_naming(
        shifted, "label grid differs", lambda: check_same_grid(image, read_header(shifted))
    )
    assert case["image"] in message and "0.5" in message

    cropped = write_nifti(phantom.label[:, :, :30], phantom.affine, tmp_path / "cropped_seg.nii.gz")
    message = _raises_naming(cropped, "shape", lambda: check_same_grid(image, read_header(cropped)))
    assert "(48, 48, 30)" in message and "(48, 48, 32)" in message


def test_validate_volumed_channel_handling():
    meta = {"filename_or_obj": "/data/b.nii.gz"}
    four = MetaTensor(torch.arange(3.0).reshape(3, 1, 1, 1).expand(3, 8, 8, 8).clone(), meta=meta)
    with pytest.raises(InputError, match="4D") as err:
        ValidateVolumed("image")({"image": four})
    assert "/data/b.nii.gz" in str(err.value) and "3 volumes" in str(err.value)
    picked = ValidateVolumed("image", allow_4d_index=2)({"image": four})["image"]
    assert picked.shape == (1, 8, 8, 8) and torch.all(picked == 2)
    assert isinstance(picked, MetaTensor) and picked.meta["filename_or_obj"] == "/data/b.nii.gz"
    assert ValidateVolumed("image", multichannel=True)({"image": four})["image"] is four
    flat = MetaTensor(torch.zeros(1, 8, 8), meta=meta)
    with pytest.raises(InputError, match="2D"):
        ValidateVolumed("image")({"image": flat})
    plain = torch.zeros(8, 8, 8)
    assert ValidateVolumed("image", channel_dim=None)({"image": plain})["image"] is plain
    with pytest.raises(InputError, match="<image>: image is 2D"):
        ValidateVolumed("image", channel_dim=None)({"image": torch.zeros(8, 8)})


def test_select_volume_shapes():
    assert select_volume(np.zeros((4, 5, 6, 1, 1)), "x").shape == (4, 5, 6)
    with pytest.raises(InputError, match="5D"):
        select_volume(np.zeros((4, 5, 6, 2, 2)), "x")
    with pytest.raises(InputError, match="1D"):
        select_volume(np.zeros((4, 1, 1)), "x")
    with pytest.raises(ValueError, match="min_shape"):
        check_volume(np.zeros((4, 5, 6)), "x", min_shape=(1, 2))


def test_4d_nifti_header(tmp_path):
    path = tmp_path / "t.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 9, 10, 4), np.float32), np.eye(4)), str(path))
    header = read_header(path)
    assert (header.shape, header.ndim, header.n_volumes) == ((8, 9, 10), 4, 4)
