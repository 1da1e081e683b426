import pytest

from medssl3d.methods import METHODS, SSLMethod, build_method

BUNDLES = __import__("pathlib").Path(__file__).resolve().parents[2] / "bundles"


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_registered_method_builds_and_carries_its_name(name):
    method = build_method(name, backbone_size="tiny")
    assert isinstance(method, SSLMethod)
    assert method.name == name


def test_every_method_has_a_bundle_of_its_name():
    for name in METHODS:
        assert (BUNDLES / name / "configs" / "train.json").is_file(), name


def test_unknown_method_is_refused_by_name():
    with pytest.raises(ValueError, match="'nope'"):
        build_method("nope")
