import logging

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medssl3d.data.dicom import POSITION_ATOL, scan_dicom_series
from medssl3d.data.errors import InputError
from medssl3d.data.phantoms import make_phantom, write_dicom_series
from medssl3d.data.readers import read_header, volume_loader

SHAPE = (24, 20, 32)
ROTATION = (20.0, -15.0, 30.0)  # oblique: every LPS coordinate of the slice positions changes
JITTER_MM = 0.1  # scanners' rounding of slice positions
AFFINE_ATOL = 1e-4
LOGGER = "medssl3d.data.dicom"


def _affine(tensor: MetaTensor) -> np.ndarray:
    return np.asarray(tensor.affine, dtype=float)


def _oblique_mri(slice_spacing: float):
    return make_phantom(shape=SHAPE, spacing=(0.9, 0.9, slice_spacing), modality="mri", seed=3, rotation_deg=ROTATION)


def _write_with_gap(array, affine, folder, extra_slices: float, **kwargs):
    """One series in two halves (same SeriesInstanceUID), the second moved ``extra_slices`` slices further."""
    half = array.shape[2] // 2
    moved = affine.copy()
    moved[:3, 3] = (affine @ np.array([0.0, 0.0, half + extra_slices, 1.0]))[:3]
    uids = {"series_uid": "1.2.826.0.1.3680043.2.1125.7", "study_uid": "1.2.826.0.1.3680043.2.1125.8"}
    write_dicom_series(array[..., :half], affine, folder, file_prefix="a", seed=1, **uids, **kwargs)
    write_dicom_series(array[..., half:], moved, folder, file_prefix="b", seed=2, **uids, **kwargs)
    return folder


@pytest.mark.parametrize("slice_spacing", [1.5, 6.5], ids=["1.5mm", "6.5mm-1.5pct"])
def test_jittered_oblique_series_loads_like_the_uniform_one(tmp_path, caplog, slice_spacing):
    phantom = _oblique_mri(slice_spacing)
    uniform = write_dicom_series(phantom.image, phantom.affine, tmp_path / "uniform", modality="mri")
    jittered = write_dicom_series(
        phantom.image, phantom.affine, tmp_path / "jittered", modality="mri", spacing_jitter=JITTER_MM / slice_spacing
    )
    load = volume_loader("image")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        a = load({"image": str(uniform)})["image"]
    assert "off a uniform grid" not in caplog.text
    with caplog.at_level(logging.INFO, logger=LOGGER):
        b = load({"image": str(jittered)})["image"]

    series = scan_dicom_series(jittered)
    deviation = float(np.abs(series.grid_deviations).max())
    assert 0.01 * slice_spacing < deviation <= POSITION_ATOL
    assert str(jittered) in caplog.text and "off a uniform grid" in caplog.text
    assert f"{deviation:.3g} mm" in caplog.text
    assert torch.equal(a, b)
    # The grid runs from the first to the last slice, each off by up to the jitter: so is the affine.
    np.testing.assert_allclose(_affine(b), _affine(a), atol=JITTER_MM + AFFINE_ATOL)
    np.testing.assert_allclose(_affine(a), phantom.affine, atol=AFFINE_ATOL)
    header = read_header(jittered)
    assert header.shape == SHAPE
    np.testing.assert_allclose(header.affine, _affine(b), atol=AFFINE_ATOL)


def test_missing_slice_in_a_jittered_series_is_refused(tmp_path):
    phantom = _oblique_mri(1.5)
    folder = write_dicom_series(
        phantom.image, phantom.affine, tmp_path / "s", spacing_jitter=JITTER_MM / 1.5, drop_slices=(15,)
    )
    for kwargs in ({}, {"allow_nonuniform_spacing": True}):
        with pytest.raises(InputError, match="missing slice") as err:
            volume_loader("image", **kwargs)({"image": str(folder)})
        assert str(folder) in str(err.value) and "slice_0014.dcm" in str(err.value)
    with pytest.raises(InputError, match="missing slice"):
        read_header(folder)


def test_gap_of_twice_the_spacing_in_a_jittered_series_is_refused(tmp_path):
    phantom = _oblique_mri(1.5)
    folder = _write_with_gap(phantom.image, phantom.affine, tmp_path / "s", 1.0, spacing_jitter=JITTER_MM / 1.5)
    for call in (lambda: read_header(folder), lambda: volume_loader("image")({"image": str(folder)})):
        with pytest.raises(InputError, match="missing slice") as err:
            call()
        assert str(folder) in str(err.value) and "a_0015.dcm" in str(err.value) and "b_0000.dcm" in str(err.value)


def test_gap_beyond_the_tolerance_is_refused_unless_resampling_is_allowed(tmp_path):
    phantom = _oblique_mri(1.5)
    # Known answer: each slice holds its position along the normal, 0.6 mm (0.4 slices) extra after slice 15.
    positions = 1.5 * (np.arange(SHAPE[2]) + 0.4 * (np.arange(SHAPE[2]) >= SHAPE[2] // 2))
    ramp = np.broadcast_to(positions, SHAPE).astype(np.float32)
    folder = _write_with_gap(ramp, phantom.affine, tmp_path / "s", 0.4)

    with pytest.raises(InputError, match="non-uniform slice spacing") as err:
        volume_loader("image")({"image": str(folder)})
    assert str(folder) in str(err.value) and f"tolerance {POSITION_ATOL} mm" in str(err.value)

    loaded = volume_loader("image", allow_nonuniform_spacing=True)({"image": str(folder)})["image"]
    targets = 1.5 * np.arange(loaded.shape[-1])
    assert loaded.shape == (1, *SHAPE[:2], 32) and targets[-1] <= positions[-1]
    np.testing.assert_allclose(loaded[0, 5, 5].numpy(), targets, atol=0.01)
    np.testing.assert_allclose(np.linalg.norm(_affine(loaded)[:3, 2]), 1.5, rtol=1e-6)
    header = read_header(folder, allow_nonuniform_spacing=True)
    assert header.shape == tuple(loaded.shape[1:])
    np.testing.assert_allclose(header.affine, _affine(loaded), atol=AFFINE_ATOL)
