from dataclasses import dataclass

import pytest

from medssl3d.data.errors import InputError
from medssl3d.methods.presets import config_from_kwargs, config_from_yaml


@dataclass(frozen=True)
class Toy:
    width: int = 4
    temperature: float = 0.1


def test_kwargs_build_and_refuse_unknown_fields_by_name():
    assert config_from_kwargs(Toy, width=8) == Toy(width=8)
    with pytest.raises(ValueError, match="'depth'"):
        config_from_kwargs(Toy, depth=3)


def test_yaml_preset_with_overrides(tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text("base:\n  width: 4\n  temperature: 0.1\nwide:\n  width: 16\n  temperature: 0.2\n")
    assert config_from_yaml(Toy, path, "wide") == Toy(16, 0.2)
    assert config_from_yaml(Toy, path, "wide", temperature=0.5) == Toy(16, 0.5)
    with pytest.raises(ValueError, match="'huge'"):
        config_from_yaml(Toy, path, "huge")


def test_yaml_errors_name_the_file(tmp_path):
    with pytest.raises(InputError, match="missing.yaml"):
        config_from_yaml(Toy, tmp_path / "missing.yaml")
    path = tmp_path / "bad.yaml"
    path.write_text("base:\n  width: 4\n  depth: 2\n")
    with pytest.raises(InputError, match="bad.yaml"):
        config_from_yaml(Toy, path)
