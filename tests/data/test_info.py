import json

import numpy as np
import pytest

from medssl3d.data.errors import InputError
from medssl3d.data.info import describe
from medssl3d.data.phantoms import make_phantom, write_case, write_dicom_series


@pytest.mark.parametrize("fmt", ["nifti", "dicom", "nrrd", "mha"])
def test_describe_reports_geometry_and_intensity(tmp_path, fmt):
    phantom = make_phantom(shape=(40, 36, 32), spacing=(0.8, 0.9, 2.0), origin=(1.0, 2.0, 3.0), seed=3)
    path = write_case(tmp_path, "c", phantom, fmt, with_label=False)["image"]
    info = describe(path)
    assert json.loads(json.dumps(info)) == info
    assert info["path"] == path and info["format"] == fmt
    assert info["shape"] == [40, 36, 32] and (info["ndim"], info["n_volumes"]) == (3, 1)
    assert info["spacing"] == pytest.approx([0.8, 0.9, 2.0])
    assert info["orientation"] == "RAS"
    np.testing.assert_allclose(info["direction"], np.diag([-1.0, -1.0, 1.0]), atol=1e-9)
    assert info["origin"] == pytest.approx([-1.0, -2.0, 3.0])
    np.testing.assert_allclose(info["affine"], phantom.affine, atol=1e-4)
    intensity = info["intensity"]
    assert intensity["min"] == float(phantom.image.min()) and intensity["max"] == float(phantom.image.max())
    assert intensity["mean"] == pytest.approx(float(phantom.image.mean()), abs=1e-3)
    assert intensity["percentiles"]["p50"] == pytest.approx(float(np.median(phantom.image)))
    assert intensity["n_nonfinite"] == 0
    if fmt == "dicom":
        assert info["series_uid"] == info["series_in_folder"][0]
    else:
        assert info["series_uid"] is None and info["series_in_folder"] is None


def test_describe_oblique_orientation_and_nonfinite(tmp_path):
    phantom = make_phantom(shape=(24,) * 3, rotation_deg=(90, 0, 0))
    phantom.image[0, 0, 0] = np.nan
    info = describe(write_case(tmp_path, "c", phantom, "nifti", with_label=False)["image"])
    assert info["orientation"] == "RSP"
    assert info["intensity"]["n_nonfinite"] == 1
    assert info["intensity"]["min"] == float(np.nanmin(phantom.image))


def test_describe_picks_a_series_and_names_bad_inputs(tmp_path):
    folder = tmp_path / "two"
    for uid, prefix in (("1.2.3.1", "a"), ("1.2.3.2", "b")):
        p = make_phantom(shape=(16, 16, 12), seed=int(uid[-1]))
        write_dicom_series(p.image, p.affine, folder, series_uid=uid, file_prefix=prefix)
    assert describe(folder, series_uid="1.2.3.2")["series_uid"] == "1.2.3.2"
    with pytest.raises(InputError, match="1.2.3.1, 1.2.3.2|1.2.3.2, 1.2.3.1") as err:
        describe(folder)
    assert str(folder) in str(err.value)
    with pytest.raises(InputError, match="not found") as err:
        describe(tmp_path / "missing.nii.gz")
    assert "missing.nii.gz" in str(err.value)
