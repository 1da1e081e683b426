import dataclasses
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Invertd, Lambdad

from medssl3d.data.errors import InputError
from medssl3d.data.phantoms import make_phantom, write_case, write_dicom_series
from medssl3d.data.presets import (
    CT_HU_WINDOW_MAX,
    CT_HU_WINDOW_MIN,
    CT_PRESET,
    MRI_PRESET,
    PresetConfig,
    build_preset,
    cached_dataset,
    preset_from_yaml,
    preset_hash,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "data"
SHAPE = (40, 36, 32)
AIR_PAD = 12
AIR_HU = -1000.0


def _spacing(affine) -> np.ndarray:
    return np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)


@pytest.fixture(scope="module")
def ct_case(tmp_path_factory):
    """A CT phantom at 1 x 1.25 x 2 mm stored in LPS-like (flipped) orientation."""
    root = tmp_path_factory.mktemp("ct")
    ph = make_phantom(SHAPE, spacing=(1.0, 1.25, 2.0), modality="ct", seed=0)
    # Surround the body with air so that there is something to crop away.
    ph.image = np.pad(ph.image, AIR_PAD, constant_values=AIR_HU)
    ph.label = np.pad(ph.label, AIR_PAD)
    ph.affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ph.affine  # stored L->R and P->A flipped
    assert nib.aff2axcodes(ph.affine) == ("L", "P", "S")
    return write_case(root, "ct0", ph), ph


@pytest.fixture(scope="module")
def mri_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("mri")
    ph = make_phantom((32, 32, 32), spacing=(1.2, 1.2, 1.5), modality="mri", seed=3)
    return write_case(root, "mr0", ph), ph


def test_ct_preset_spacing_orientation_range_and_labels(ct_case):
    case, ph = ct_case
    out = build_preset(CT_PRESET)(case)
    image, label = out["image"], out["label"]
    assert image.dtype == torch.float32 and image.shape[0] == 1 and label.shape == image.shape
    np.testing.assert_allclose(_spacing(image.affine), CT_PRESET.spacing, atol=1e-5)
    assert nib.aff2axcodes(image.affine.numpy()) == ("R", "A", "S")
    assert torch.equal(image.affine, label.affine)
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert image.max() == 1.0 and image.min() == 0.0  # bone saturates the window, air clips to 0
    assert set(torch.unique(label).tolist()) == set(ph.label_names)  # nearest: no new values, none lost


def test_ct_window_maps_known_hu_values(ct_case):
    case, _ = ct_case
    cfg = dataclasses.replace(CT_PRESET, crop_foreground=False)
    image = build_preset(cfg, keys=("image",))({"image": case["image"]})["image"]
    raw = build_preset(dataclasses.replace(cfg, a_min=0.0, a_max=1.0, clip=False), keys=("image",))(
        {"image": case["image"]}
    )["image"]
    expected = np.clip((raw.numpy() - CT_HU_WINDOW_MIN) / (CT_HU_WINDOW_MAX - CT_HU_WINDOW_MIN), 0, 1)
    np.testing.assert_allclose(image.numpy(), expected, atol=1e-5)


def _bbox_shape(mask: np.ndarray) -> tuple[int, ...]:
    idx = np.nonzero(mask)
    return tuple(int(i.max() - i.min() + 1) for i in idx)


def test_crop_to_foreground_shrinks_to_the_body_box_plus_margin(ct_case):
    case, ph = ct_case
    full = build_preset(dataclasses.replace(CT_PRESET, crop_foreground=False))(case)
    body_box = _bbox_shape(full["image"][0].numpy() > CT_PRESET.foreground_threshold)
    tight = build_preset(dataclasses.replace(CT_PRESET, crop_margin=0))(case)
    assert tuple(tight["image"].shape[1:]) == body_box
    cropped = build_preset(CT_PRESET)(case)
    expected = tuple(
        min(b + 2 * CT_PRESET.crop_margin, f) for b, f in zip(body_box, full["image"].shape[1:], strict=True)
    )
    assert tuple(cropped["image"].shape[1:]) == expected
    assert cropped["image"].numel() < full["image"].numel()
    for value in ph.label_names:  # nothing labelled is cut away
        assert (cropped["label"] == value).sum() == (full["label"] == value).sum() or value == 0
    np.testing.assert_allclose(_spacing(cropped["image"].affine), _spacing(full["image"].affine))


def test_cached_output_can_be_inverted_to_the_original_grid(tmp_path, ct_case):
    case, ph = ct_case
    ds = cached_dataset([case], CT_PRESET, tmp_path / "cache")
    ds[0]  # fill the cache
    item = cached_dataset([case], CT_PRESET, tmp_path / "cache")[0]  # read back from it
    inverse = Invertd("label", transform=build_preset(CT_PRESET), orig_keys="label", nearest_interp=True)
    restored = inverse(item)["label"][0].numpy()
    assert restored.shape == ph.label.shape
    assert (restored == ph.label).mean() > 0.99


def test_mri_preset_percentiles(mri_case):
    case, _ = mri_case
    out = build_preset(MRI_PRESET)(case)
    image = out["image"]
    np.testing.assert_allclose(_spacing(image.affine), MRI_PRESET.spacing, atol=1e-5)
    assert nib.aff2axcodes(image.affine.numpy()) == ("R", "A", "S")
    assert image.min() >= 0.0 and image.max() <= 1.0
    full = build_preset(dataclasses.replace(MRI_PRESET, crop_foreground=False, clip=False), keys=("image",))
    values = full({"image": case["image"]})["image"].numpy().ravel()
    lo, hi = np.percentile(values, [MRI_PRESET.lower_percentile, MRI_PRESET.upper_percentile])
    np.testing.assert_allclose([lo, hi], [0.0, 1.0], atol=1e-4)


def test_mri_preset_with_n4_flattens_the_bias_field(mri_case):
    case, ph = mri_case
    liver = next(v for v, name in ph.label_names.items() if name == "liver")

    def liver_cv(cfg):
        out = build_preset(cfg)(case)
        values = out["image"][0][out["label"][0] == liver]
        return float(values.std() / values.mean()), out

    cfg = dataclasses.replace(MRI_PRESET, n4_bias_correction=True, n4_shrink_factor=2, n4_iterations=(10, 10))
    cv_plain, plain = liver_cv(MRI_PRESET)
    cv_n4, corrected = liver_cv(cfg)
    assert corrected["image"].shape == plain["image"].shape
    assert torch.isfinite(corrected["image"]).all() and corrected["image"].max() <= 1.0
    assert cv_n4 < cv_plain  # the phantom's smooth bias field is (partly) removed


def test_modality_picks_scaling_and_threshold_defaults():
    assert PresetConfig("ct", (1.5, 1.5, 1.5), "RAS") == CT_PRESET  # contract field order
    assert PresetConfig(modality="mri", spacing=[1, 1, 1]) == MRI_PRESET  # lists normalised to tuples
    assert CT_PRESET.scaling == "window" and MRI_PRESET.scaling == "percentile"
    assert MRI_PRESET.foreground_threshold > CT_PRESET.foreground_threshold
    explicit = PresetConfig("mri", (1.0, 1.0, 1.0), scaling="window", foreground_threshold=0.2)
    assert explicit.scaling == "window" and explicit.foreground_threshold == 0.2


def test_yaml_presets_mirror_the_dataclass_defaults():
    assert preset_from_yaml(CONFIGS / "ct.yaml") == CT_PRESET
    assert preset_from_yaml(CONFIGS / "mri.yaml") == MRI_PRESET


def test_yaml_overrides_and_errors(tmp_path):
    cfg = preset_from_yaml(CONFIGS / "ct.yaml", spacing=[2.0, 2.0, 3.0], crop_margin=2)
    assert cfg.spacing == (2.0, 2.0, 3.0) and cfg.crop_margin == 2 and cfg.a_min == CT_PRESET.a_min
    with pytest.raises(ValueError, match="spacings"):
        preset_from_yaml(CONFIGS / "ct.yaml", spacings=[1, 1, 1])
    bad = tmp_path / "bad.yaml"
    bad.write_text((CONFIGS / "ct.yaml").read_text() + "window_width: 300\n")
    with pytest.raises(InputError, match="window_width") as info:
        preset_from_yaml(bad)
    assert str(bad) in str(info.value)
    partial = tmp_path / "partial.yaml"
    partial.write_text("modality: ct\n")
    with pytest.raises(InputError, match="spacing"):
        preset_from_yaml(partial)
    with pytest.raises(InputError, match="not found"):
        preset_from_yaml(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"modality": "pet"}, "modality"),
        ({"scaling": "zscore"}, "scaling"),
        ({"spacing": (1.0, 0.0, 1.0)}, "spacing"),
        ({"axcodes": "RRS"}, "axcodes"),
        ({"a_min": 300.0}, "a_min"),
        ({"lower_percentile": 99.9}, "percentile"),
    ],
)
def test_preset_config_validation(change, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(CT_PRESET, **change)


def test_preset_hash_depends_on_every_field_and_keys():
    base = preset_hash(CT_PRESET, ("image", "label"))
    assert base == preset_hash(PresetConfig(**dataclasses.asdict(CT_PRESET)), ["image", "label"])
    assert base != preset_hash(CT_PRESET, ("image",))
    assert base != preset_hash(MRI_PRESET, ("image", "label"))
    assert base != preset_hash(dataclasses.replace(CT_PRESET, crop_margin=9), ("image", "label"))


def test_persistent_cache_is_keyed_by_preset_and_used_on_second_pass(tmp_path, ct_case):
    case, _ = ct_case
    src = tmp_path / "src"
    src.mkdir()
    data = []
    for name in ("x", "y"):
        entry = {k: str(src / f"{name}_{Path(v).name}") for k, v in case.items()}
        for k, v in case.items():
            Path(entry[k]).write_bytes(Path(v).read_bytes())
        data.append(entry)
    cache_root = tmp_path / "cache"
    plus_one = Lambdad("image", lambda x: x + 1.0)
    ds = cached_dataset(data, CT_PRESET, cache_root, keys=("image", "label"), extra_transforms=[plus_one])
    assert Path(ds.cache_dir) == cache_root / preset_hash(CT_PRESET, ("image", "label"))
    first = [ds[i] for i in range(len(ds))]
    assert len(list(Path(ds.cache_dir).glob("*.pt"))) == 2
    assert (Path(ds.cache_dir) / "preset.json").is_file()

    sources = [Path(p) for e in data for p in e.values()]
    for p in sources:
        p.unlink()  # a second pass that decoded files again would now fail
    again = cached_dataset(data, CT_PRESET, cache_root, keys=("image", "label"), extra_transforms=[plus_one])
    second = [again[i] for i in range(len(again))]
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
        assert torch.equal(a["image"].affine, b["image"].affine)
        np.testing.assert_allclose(_spacing(b["image"].affine), CT_PRESET.spacing, atol=1e-5)
    # The extra transform ran on top of the cache and was not baked into it.
    assert second[0]["image"].min() == 1.0

    # A changed preset gets its own folder and never reuses the stale cache: with the sources gone it fails.
    changed = cached_dataset(data, dataclasses.replace(CT_PRESET, spacing=(2.0, 2.0, 2.0)), cache_root)
    assert changed.cache_dir != ds.cache_dir
    with pytest.raises(RuntimeError) as info:  # MONAI's Compose wraps the reader's InputError
        changed[0]
    cause = info.value
    while cause is not None and not isinstance(cause, InputError):
        cause = cause.__cause__
    assert cause is not None and "x_ct0" in cause.path


def test_entries_of_a_multi_series_folder_load_their_own_series(tmp_path):
    folder = tmp_path / "multi"
    phantoms = {}
    for tag, uid, seed in (("s1", "1.2.3.1", 1), ("s2", "1.2.3.2", 2)):
        ph = make_phantom((32, 32, 32), spacing=(1.5, 1.5, 1.5), seed=seed)
        tmp = write_dicom_series(ph.image, ph.affine, tmp_path / tag, series_uid=uid)
        folder.mkdir(exist_ok=True)
        for f in sorted(tmp.iterdir()):
            f.rename(folder / f"{tag}_{f.name}")
        phantoms[uid] = ph
    cfg = dataclasses.replace(
        CT_PRESET, crop_foreground=False, scaling="window", a_min=0.0, a_max=1.0, clip=False
    )
    preset = build_preset(cfg, keys=("image",))
    for uid, ph in phantoms.items():
        image = preset({"image": str(folder), "series_uid": uid})["image"][0].numpy()
        np.testing.assert_allclose(image, ph.image, atol=1e-3)  # already RAS at 1.5 mm: no resampling
    with pytest.raises(RuntimeError):
        preset({"image": str(folder)})  # two series and no UID: refused, never a silent pick


def test_preset_from_yaml_refuses_broken_yaml_and_bad_values(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("modality: ct\nspacing: [1, 1\n")
    with pytest.raises(InputError, match="not valid YAML"):
        preset_from_yaml(broken)
    bad_axcodes = tmp_path / "axcodes.yaml"
    bad_axcodes.write_text((CONFIGS / "ct.yaml").read_text().replace("axcodes: RAS", "axcodes: RAX"))
    with pytest.raises(InputError, match="axcodes"):
        preset_from_yaml(bad_axcodes)
