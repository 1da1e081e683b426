import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medssl3d.data.phantoms import (
    LABEL_NAMES,
    make_phantom,
    write_case,
    write_dicom_series,
    write_itk_image,
    write_nifti,
)


def _median(phantom, name):
    value = {v: k for k, v in phantom.label_names.items()}[name]
    return float(np.median(phantom.image[phantom.label == value]))


def _dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("shape", [(64, 64, 64), (32, 32, 32), (48, 40, 32)])
def test_every_structure_is_present(shape):
    phantom = make_phantom(shape=shape)
    assert phantom.image.shape == phantom.label.shape == shape
    assert phantom.image.dtype == np.float32 and phantom.label.dtype == np.uint8
    assert phantom.label_names[0] == "background"
    assert len(phantom.label_names) - 1 >= 3
    assert set(np.unique(phantom.label)) == set(phantom.label_names)


def test_ct_values_are_in_hounsfield_ranges(phantom_ct):
    assert _median(phantom_ct, "background") == pytest.approx(-1000, abs=15)
    assert -130 <= _median(phantom_ct, "fat") <= -70
    for organ in ("body", "liver", "spleen"):
        assert 30 <= _median(phantom_ct, organ) <= 60, organ
    assert 400 <= _median(phantom_ct, "spine") <= 1000
    assert -10 <= _median(phantom_ct, "fluid") <= 25
    spine = phantom_ct.image[phantom_ct.label == 5]
    assert np.percentile(spine, 5) > 350 and np.percentile(spine, 95) < 1050
    assert np.array_equal(phantom_ct.image, np.round(phantom_ct.image)), (
        "CT is integer HU, as scanners store it"
    )
    assert phantom_ct.image.min() >= -1024
    # mild noise: a uniform region is not constant, but its spread is a few HU
    assert 3 < phantom_ct.image[phantom_ct.label == 1].std() < 20


def test_mri_contrast_is_positive_t1_like(phantom_mri):
    assert phantom_mri.image.min() >= 0
    assert _median(phantom_mri, "fat") > _median(phantom_mri, "body") > _median(phantom_mri, "fluid")
    assert _median(phantom_mri, "background") < 0.1 * _median(phantom_mri, "body")


def _octant_spread(phantom, value):
    """Relative spread of a tissue's mean intensity over the eight octants of the volume."""
    half = [n // 2 for n in phantom.image.shape]
    means = []
    for a in (slice(0, half[0]), slice(half[0], None)):
        for b in (slice(0, half[1]), slice(half[1], None)):
            for c in (slice(0, half[2]), slice(half[2], None)):
                means.append(phantom.image[a, b, c][phantom.label[a, b, c] == value].mean())
    return (max(means) - min(means)) / np.mean(means)


def test_mri_bias_field_varies_intensity_smoothly_across_the_body():
    biased = make_phantom(shape=(48, 48, 48), modality="mri", seed=2, deform=False)
    flat = make_phantom(shape=(48, 48, 48), modality="mri", seed=2, deform=False, bias_field=False)
    assert _octant_spread(flat, 1) < 0.01
    assert _octant_spread(biased, 1) > 0.05


def test_same_seed_same_phantom_different_seed_different_subject():
    a, b, c = (
        make_phantom(shape=(32,) * 3, seed=5),
        make_phantom(shape=(32,) * 3, seed=5),
        make_phantom(shape=(32,) * 3, seed=6),
    )
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    assert not np.array_equal(a.image, c.image)
    assert not np.array_equal(a.label, c.label)


def test_deformation_changes_the_shape_of_structures():
    plain = make_phantom(seed=1, deform=False)
    deformed = make_phantom(seed=1, deform=True)
    other_plain = make_phantom(seed=9, deform=False)
    # without deformation the anatomy is canonical: only the noise depends on the seed
    assert np.array_equal(plain.label, other_plain.label)
    assert not np.array_equal(plain.image, other_plain.image)
    for value in (1, 3, 4, 5, 6):
        dice = _dice(plain.label == value, deformed.label == value)
        assert 0.3 < dice < 0.98, (LABEL_NAMES[value], dice)


def test_rotation_gives_an_oblique_affine_and_keeps_voxels():
    straight = make_phantom(shape=(32,) * 3, spacing=(1.0, 2.0, 3.0))
    oblique = make_phantom(shape=(32,) * 3, spacing=(1.0, 2.0, 3.0), rotation_deg=(30, 0, 45))
    assert np.array_equal(straight.image, oblique.image)
    assert oblique.spacing == pytest.approx((1.0, 2.0, 3.0))
    m = oblique.affine[:3, :3] / np.asarray(oblique.spacing)
    np.testing.assert_allclose(m.T @ m, np.eye(3), atol=1e-12)
    assert np.count_nonzero(np.abs(m) > 1e-6) > 3, "direction is oblique"
    centre = oblique.affine @ np.array([15.5, 15.5, 15.5, 1.0])
    np.testing.assert_allclose(centre[:3], 0, atol=1e-9)  # centred on the world origin by default


def test_origin_places_the_first_voxel():
    phantom = make_phantom(shape=(16,) * 3, origin=(10.0, -20.0, 30.0))
    np.testing.assert_allclose(phantom.affine[:3, 3], (10, -20, 30))


def test_bad_arguments_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match="modality"):
        make_phantom(modality="pet")
    with pytest.raises(ValueError, match="shape"):
        make_phantom(shape=(32, 32))
    with pytest.raises(ValueError, match="3D"):
        write_dicom_series(np.zeros((8, 8)), np.eye(4), tmp_path / "d")
    with pytest.raises(ValueError, match="spacing_jitter"):
        write_dicom_series(np.zeros((8, 8, 8)), np.eye(4), tmp_path / "d", spacing_jitter=0.6)
    with pytest.raises(ValueError, match="fmt"):
        write_case(tmp_path, "x", make_phantom(shape=(8,) * 3), fmt="png")


def test_write_nifti_keeps_array_and_affine(tmp_path):
    phantom = make_phantom(shape=(24, 20, 16), rotation_deg=(10, 20, 30))
    img = nib.load(write_nifti(phantom.image, phantom.affine, tmp_path / "sub" / "a.nii.gz"))
    assert np.array_equal(np.asarray(img.dataobj), phantom.image)
    np.testing.assert_allclose(img.affine, phantom.affine, atol=1e-5)
    assert int(img.header["qform_code"]) == int(img.header["sform_code"]) == 1


def test_dicom_series_is_read_by_plain_simpleitk_in_lps(tmp_path):
    phantom = make_phantom(shape=(24, 20, 16), spacing=(0.8, 0.9, 2.5), origin=(10.0, 20.0, -30.0))
    folder = write_dicom_series(phantom.image, phantom.affine, tmp_path / "s", series_uid="1.2.3.9")
    assert sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) == ("1.2.3.9",)
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), "1.2.3.9")
    assert len(files) == 16
    image = sitk.ReadImage(files)
    # NIfTI RAS (x, y, z) is DICOM LPS (-x, -y, z)
    assert image.GetOrigin() == pytest.approx((-10.0, -20.0, -30.0))
    assert image.GetSpacing() == pytest.approx((0.8, 0.9, 2.5))
    np.testing.assert_allclose(
        np.reshape(image.GetDirection(), (3, 3)), np.diag([-1.0, -1.0, 1.0]), atol=1e-9
    )
    assert np.array_equal(sitk.GetArrayFromImage(image).T, phantom.image)

    reader = sitk.ImageFileReader()
    reader.SetFileName(files[3])
    reader.ReadImageInformation()
    tags = {k: reader.GetMetaData(k).strip() for k in reader.GetMetaDataKeys()}
    assert tags["0008|0060"] == "CT"
    assert tags["0020|000e"] == "1.2.3.9"
    assert tags["0020|0013"] == "4"
    assert float(tags["0018|0050"]) == pytest.approx(2.5)
    assert float(tags["0028|1052"]) == -1024 and float(tags["0028|1053"]) == 1
    assert tags["0028|0100"] == "16" and tags["0028|0103"] == "1"
    assert "0020|000d" in tags and "0020|0037" in tags and "0020|0032" in tags


def test_dicom_bad_input_options_change_positions_and_files(tmp_path):
    volume = np.zeros((8, 8, 12), dtype=np.float32)
    folder = write_dicom_series(volume, np.eye(4), tmp_path / "s", drop_slices=(4, 5))
    assert len(list(folder.glob("*.dcm"))) == 10
    jittered = write_dicom_series(volume, np.eye(4), tmp_path / "j", spacing_jitter=0.3)
    reader = sitk.ImageFileReader()
    z = []
    for f in sorted(jittered.glob("*.dcm")):
        reader.SetFileName(str(f))
        reader.ReadImageInformation()
        z.append(reader.GetOrigin()[2])
    gaps = np.diff(z)
    assert np.all(gaps > 0.3) and gaps.max() - gaps.min() > 0.05


def test_write_itk_image_and_case_formats(tmp_path):
    phantom = make_phantom(shape=(16,) * 3)
    with pytest.raises(ValueError, match="path"):
        write_itk_image(phantom.image, phantom.affine, tmp_path / "a.png")
    for fmt, suffix in (("nrrd", ".nrrd"), ("mha", ".mha"), ("nifti", ".nii.gz")):
        case = write_case(tmp_path, f"c_{fmt}", phantom, fmt=fmt)
        assert case["image"].endswith(suffix)
        assert case["label"].endswith(f"c_{fmt}_seg.nii.gz")
    case = write_case(tmp_path, "c_dicom", phantom, fmt="dicom", with_label=False)
    assert set(case) == {"image"} and len(list((tmp_path / "c_dicom").glob("*.dcm"))) == 16


def test_windowed_clips_and_scales_to_unit_range():
    phantom = make_phantom(shape=(32, 32, 32), seed=1)
    image = phantom.windowed(-200.0, 300.0)
    assert image.dtype == np.float32 and image.shape == phantom.image.shape
    assert image.min() == 0.0 and image.max() == 1.0
    inside = (phantom.image > -200.0) & (phantom.image < 300.0)
    expected = (phantom.image[inside] - max(phantom.image.min(), -200.0)) / (
        min(phantom.image.max(), 300.0) - max(phantom.image.min(), -200.0)
    )
    np.testing.assert_allclose(image[inside], expected, rtol=1e-5, atol=1e-6)
