"""Locating bundles, command-line overrides, and bad input unwrapped from MONAI's wrappers."""

import pytest

from medssl3d.data.errors import DatalistError, InputError
from medssl3d.jobs.bundles import BundleJob, bundle_dir, parse_overrides, resource_dir, user_errors


def test_bundles_and_presets_are_found_and_unknown_bundles_listed():
    assert (bundle_dir("segmentation") / "configs" / "evaluate.json").is_file()
    assert (resource_dir("configs") / "methods" / "swin_ssl.yaml").is_file()
    with pytest.raises(ValueError, match=r"no bundle 'nope' in .*'segmentation'"):
        bundle_dir("nope")


def test_overrides_parse_json_values_and_refuse_other_forms():
    parsed = parse_overrides(["roi_size=[64,64,64]", "lr=1e-4", "modality=mri", "resume=false", "a#b=x=y"])
    assert parsed == {"roi_size": [64, 64, 64], "lr": 1e-4, "modality": "mri", "resume": False, "a#b": "x=y"}
    for bad in ("lr", "=3"):
        with pytest.raises(ValueError, match="not of the form id=value"):
            parse_overrides([bad])


def test_user_overrides_must_name_an_id_or_a_key_of_a_section():
    def job(**user):
        return BundleJob(bundle_dir("segmentation"), ("train",), "train", {}, user_overrides=user)

    job(val_interval=2, **{"train#trainer#epoch_length": 1}).workflow()  # an id, a new key of a section
    with pytest.raises(ValueError, match=r"^val_intervall: no such id in .*segmentation/configs \(train.json\)"):
        job(val_intervall=2).workflow()
    with pytest.raises(ValueError, match=r"^nosection#x: no such id"):
        job(**{"nosection#x": 1}).workflow()


def _wrapped(error: BaseException) -> RuntimeError:
    """``error`` inside two MONAI-style wrappers."""
    try:
        try:
            raise error
        except BaseException as e:
            raise RuntimeError("applying transform <Compose>") from e
    except RuntimeError as e:
        try:
            raise RuntimeError("Failed to evaluate ConfigExpression: ...") from e
        except RuntimeError as outer:
            return outer


def test_user_errors_unwrap_bad_input_and_keep_bugs():
    bad = InputError("/data/a.nii.gz", "image is 2D")
    with pytest.raises(InputError) as caught, user_errors():
        raise _wrapped(bad)
    assert caught.value is bad
    with pytest.raises(RuntimeError, match="Failed to evaluate"), user_errors():
        raise _wrapped(TypeError("a bug"))  # not bad input: the whole chain stays
    with pytest.raises(ValueError) as caught, user_errors():
        raise _wrapped(DatalistError("/data/list.json", ["/data/b.nii.gz: value(s) 9 are not among the classes"]))
    assert str(caught.value) == "/data/b.nii.gz: value(s) 9 are not among the classes"
    with pytest.raises(DatalistError), user_errors():  # several problems: listed, one per line
        raise DatalistError("/data/list.json", ["a: missing", "b: missing"])
