import logging
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.data import DataLoader, Dataset, ImageReader, MetaTensor
from monai.transforms import LoadImaged

from medssl3d.data.dicom import list_series, scan_dicom_series
from medssl3d.data.errors import InputError
from medssl3d.data.phantoms import make_phantom, write_case, write_dicom_series
from medssl3d.data.readers import (
    SITKReader,
    VolumeHeader,
    detect_format,
    read_header,
    volume_loader,
)

SHAPE = (48, 40, 32)
AFFINE_ATOL = 1e-4


def _affine(tensor: MetaTensor) -> np.ndarray:
    return np.asarray(tensor.affine, dtype=float)


@pytest.mark.parametrize(
    "rotation", [(0, 0, 0), (25, -10, 40), (90, 0, 0)], ids=["axis-aligned", "oblique", "coronal"]
)
def test_dicom_loads_voxel_for_voxel_like_nifti(tmp_path, rotation):
    phantom = make_phantom(shape=SHAPE, seed=4, rotation_deg=rotation, origin=(12.5, -40.0, 7.0))
    nifti = write_case(tmp_path, "n", phantom, "nifti", with_label=False)
    dicom = write_case(tmp_path, "d", phantom, "dicom", with_label=False)
    load = volume_loader("image")
    a, b = load(nifti)["image"], load(dicom)["image"]
    assert a.shape == b.shape == (1, *SHAPE)
    assert torch.equal(a, b)
    assert torch.equal(a[0], torch.from_numpy(phantom.image))
    np.testing.assert_allclose(_affine(b), _affine(a), atol=AFFINE_ATOL)
    np.testing.assert_allclose(_affine(b), phantom.affine, atol=AFFINE_ATOL)
    assert b.meta["series_uid"] == list_series(dicom["image"])[0]


def test_mri_dicom_round_trip_within_rescale_quantisation(tmp_path):
    phantom = make_phantom(shape=SHAPE, modality="mri", seed=1, rotation_deg=(0, 15, 0))
    dicom = write_case(tmp_path, "d", phantom, "dicom", with_label=False)
    loaded = volume_loader("image")(dicom)["image"][0].numpy()
    step = (phantom.image.max() - phantom.image.min()) / 32767
    assert np.abs(loaded - phantom.image).max() <= step / 2 + 1e-3


def test_sitk_reader_is_a_monai_reader_matching_the_nibabel_path(tmp_path):
    phantom = make_phantom(shape=SHAPE, seed=2, rotation_deg=(0, 0, 30))
    nifti = write_case(tmp_path, "n", phantom, "nifti", with_label=False)
    dicom = write_case(tmp_path, "d", phantom, "dicom", with_label=False)
    reader = SITKReader()
    assert isinstance(reader, ImageReader)
    assert reader.verify_suffix(dicom["image"]) and not reader.verify_suffix(nifti["image"])
    # plain MONAI LoadImaged with our reader, against MONAI's own NibabelReader
    b = LoadImaged("image", reader=reader, ensure_channel_first=True)(dicom)["image"]
    a = LoadImaged("image", reader="NibabelReader", ensure_channel_first=True)(nifti)["image"]
    assert torch.equal(a, b)
    np.testing.assert_allclose(_affine(b), _affine(a), atol=AFFINE_ATOL)
    assert b.meta["space"] == "RAS"


@pytest.mark.parametrize("fmt", ["nrrd", "mha"])
def test_nrrd_and_metaimage_round_trip(tmp_path, fmt):
    phantom = make_phantom(shape=SHAPE, modality="mri", seed=3, rotation_deg=(10, 20, 30))
    case = write_case(tmp_path, "c", phantom, fmt, with_label=False)
    assert detect_format(case["image"]) == fmt
    loaded = volume_loader("image")(case)["image"]
    assert torch.equal(loaded[0], torch.from_numpy(phantom.image))
    np.testing.assert_allclose(_affine(loaded), phantom.affine, atol=AFFINE_ATOL)


def test_mixed_datalist_loads_and_batches(tmp_path):
    phantoms = [make_phantom(shape=SHAPE, seed=s) for s in range(3)]
    datalist = [
        write_case(tmp_path, "a", phantoms[0], "nifti"),
        write_case(tmp_path, "b", phantoms[1], "dicom"),
        write_case(tmp_path, "c", phantoms[2], "mha"),
    ]
    loader = DataLoader(Dataset(datalist, volume_loader(["image", "label"])), batch_size=3)
    batch = next(iter(loader))
    assert batch["image"].shape == batch["label"].shape == (3, 1, *SHAPE)
    for i, phantom in enumerate(phantoms):
        assert torch.equal(batch["image"][i, 0], torch.from_numpy(phantom.image))
        assert torch.equal(batch["label"][i, 0], torch.from_numpy(phantom.label.astype(np.float32)))


def test_series_selected_by_uid(tmp_path):
    folder = tmp_path / "two"
    a, b = make_phantom(shape=SHAPE, seed=1), make_phantom(shape=SHAPE, seed=2)
    write_dicom_series(a.image, a.affine, folder, series_uid="1.2.826.1", file_prefix="a")
    write_dicom_series(b.image, b.affine, folder, series_uid="1.2.826.2", file_prefix="b")
    assert set(list_series(folder)) == {"1.2.826.1", "1.2.826.2"}
    loaded = volume_loader("image", series_uid="1.2.826.2")({"image": str(folder)})["image"]
    assert torch.equal(loaded[0], torch.from_numpy(b.image))
    assert read_header(folder, series_uid="1.2.826.1").series_uid == "1.2.826.1"

    with pytest.raises(InputError) as err:
        volume_loader("image")({"image": str(folder)})
    message = str(err.value)
    assert str(folder) in message and "2 DICOM series" in message
    assert "1.2.826.1" in message and "1.2.826.2" in message

    with pytest.raises(InputError, match="1.2.826.9 not found") as err:
        read_header(folder, series_uid="1.2.826.9")
    assert str(folder) in str(err.value)


def test_folder_without_series(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not dicom")
    for call in (lambda: read_header(empty), lambda: volume_loader("image")({"image": str(empty)})):
        with pytest.raises(InputError, match="no DICOM series") as err:
            call()
        assert str(empty) in str(err.value)


def test_nonuniform_spacing_is_an_error_unless_resampling_is_allowed(tmp_path, caplog):
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    jitter = {"spacing_jitter": 0.2, "seed": 7}
    probe = write_dicom_series(np.zeros((24, 24, 32)), affine, tmp_path / "probe", **jitter)
    positions = scan_dicom_series(probe, allow_nonuniform_spacing=True).positions
    # Known answer: each slice holds its own position, so linear resampling gives the target positions.
    ramp = np.broadcast_to(positions, (24, 24, 32)).astype(np.float32)
    folder = write_dicom_series(ramp, affine, tmp_path / "ramp", **jitter)

    for call in (lambda: read_header(folder), lambda: volume_loader("image")({"image": str(folder)})):
        with pytest.raises(InputError, match="non-uniform slice spacing") as err:
            call()
        assert str(folder) in str(err.value) and "allow_nonuniform_spacing" in str(err.value)

    with caplog.at_level(logging.INFO, logger="medssl3d.data.dicom"):
        loaded = volume_loader("image", allow_nonuniform_spacing=True)({"image": str(folder)})["image"]
    assert "resampled" in caplog.text and str(folder) in caplog.text
    median = float(np.median(np.diff(positions)))
    targets = positions[0] + median * np.arange(loaded.shape[-1])
    assert targets[-1] <= positions[-1] + 1e-6 and targets[-1] + median > positions[-1]
    np.testing.assert_allclose(loaded[0, 5, 5].numpy(), targets, atol=0.01)
    np.testing.assert_allclose(np.linalg.norm(_affine(loaded)[:3, 2]), median, rtol=1e-6)
    header = read_header(folder, allow_nonuniform_spacing=True)
    assert header.shape == tuple(loaded.shape[1:])
    np.testing.assert_allclose(header.affine, _affine(loaded), atol=AFFINE_ATOL)


def test_missing_slices_are_an_error_naming_the_gap(tmp_path, dicom_case):
    case = dicom_case("gappy", drop_slices=(12, 13), with_label=False)
    for kwargs in ({}, {"allow_nonuniform_spacing": True}):
        with pytest.raises(InputError, match="missing slice") as err:
            volume_loader("image", **kwargs)(case)
        message = str(err.value)
        assert case["image"] in message
        assert "gap of 4.5 mm" in message and "slice_0011.dcm" in message and "slice_0014.dcm" in message
    with pytest.raises(InputError, match="missing slice"):
        read_header(case["image"])


def test_read_header_matches_the_loaded_volume_without_reading_voxels(tmp_path, monkeypatch):
    phantom = make_phantom(shape=SHAPE, spacing=(0.8, 0.9, 2.0), seed=0, origin=(5.0, 6.0, 7.0))
    cases = {
        fmt: write_case(tmp_path, fmt, phantom, fmt, with_label=False) for fmt in ("nifti", "dicom", "mha")
    }
    loaded = {fmt: volume_loader("image")(case)["image"] for fmt, case in cases.items()}

    def no_voxels(*args, **kwargs):
        raise AssertionError("read_header read voxel data")

    monkeypatch.setattr(sitk.ImageSeriesReader, "Execute", no_voxels)
    monkeypatch.setattr(sitk, "ReadImage", no_voxels)
    for fmt, case in cases.items():
        header = read_header(case["image"])
        assert isinstance(header, VolumeHeader)
        assert header.path == case["image"]
        assert header.shape == tuple(loaded[fmt].shape[1:]) == SHAPE
        assert header.spacing == pytest.approx((0.8, 0.9, 2.0))
        np.testing.assert_allclose(header.affine, _affine(loaded[fmt]), atol=AFFINE_ATOL)
        assert header.orientation == "RAS"
        np.testing.assert_allclose(header.direction, np.diag([-1.0, -1.0, 1.0]), atol=1e-9)
        assert header.origin == pytest.approx((-5.0, -6.0, 7.0))  # LPS, as SimpleITK reports it
        assert (header.ndim, header.n_volumes) == (3, 1)
    assert read_header(cases["dicom"]["image"]).series_uid == list_series(cases["dicom"]["image"])[0]
    assert read_header(cases["nifti"]["image"]).series_uid is None


def test_unsupported_and_missing_inputs_name_the_file(tmp_path):
    png = tmp_path / "scan.png"
    png.write_bytes(b"\x89PNG")
    single = tmp_path / "one.dcm"
    single.write_bytes(b"x")
    cases = [(png, "unsupported format"), (tmp_path / "nope.nii.gz", "not found"), (single, "folder")]
    for path, problem in cases:
        for call in (lambda p=path: read_header(p), lambda p=path: volume_loader("image")({"image": str(p)})):
            with pytest.raises(InputError, match=problem) as err:
                call()
            assert str(path) in str(err.value)


def test_corrupt_metaimage_names_the_file(tmp_path):
    case = write_case(tmp_path, "c", make_phantom(shape=(16,) * 3), "mha", with_label=False)
    data = open(case["image"], "rb").read()
    with open(case["image"], "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(InputError, match="corrupt or truncated") as err:
        volume_loader("image")(case)
    assert case["image"] in str(err.value)


def test_stacked_inputs_become_channels(tmp_path):
    phantom = make_phantom(shape=SHAPE, seed=1)
    nifti = write_case(tmp_path, "n", phantom, "nifti", with_label=False)["image"]
    dicom = write_case(tmp_path, "d", phantom, "dicom", with_label=False)["image"]
    shutil.copytree(dicom, tmp_path / "d2")
    both = volume_loader("image")({"image": [nifti, dicom]})["image"]
    assert both.shape == (2, *SHAPE) and torch.equal(both[0], both[1])
    two_series = SITKReader().get_data(SITKReader().read([dicom, str(tmp_path / "d2")]))[0]
    assert two_series.shape == (2, *SHAPE)
