import logging
from dataclasses import dataclass

import pytest
from omegaconf import OmegaConf

from medssl3d.data.errors import InputError
from medssl3d.jobs.bundles import method_preset_file
from medssl3d.methods import METHODS
from medssl3d.methods.presets import (
    BASE_PRESET,
    CONFIGS,
    changed_fields,
    config_from_yaml,
    log_method_config,
    method_config_class,
    preset_names,
    resolve_method_config,
)


@dataclass(frozen=True)
class Toy:
    width: int = 4
    temperature: float = 0.1


def test_base_is_the_defaults_and_presets_and_overrides_go_over_them(tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text("wide:\n  width: 16\n  temperature: 0.2\n")
    assert config_from_yaml(Toy, path) == config_from_yaml(Toy, path, BASE_PRESET) == Toy()
    assert config_from_yaml(Toy, path, "base", width=8) == Toy(8, 0.1)
    assert config_from_yaml(Toy, path, "wide") == Toy(16, 0.2)
    assert config_from_yaml(Toy, path, "wide", temperature=0.5) == Toy(16, 0.5)
    assert preset_names(path) == ["base", "wide"]
    with pytest.raises(ValueError, match=r"'huge'.*\['base', 'wide'\]"):
        config_from_yaml(Toy, path, "huge")


def test_unknown_and_badly_typed_overrides_are_refused_by_name(tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text("wide:\n  width: 16\n")
    with pytest.raises(ValueError, match=r"unknown Toy fields \['depth'\]"):
        config_from_yaml(Toy, path, depth=3)
    with pytest.raises(ValueError, match="bad Toy override"):
        config_from_yaml(Toy, path, width="wide")


def test_yaml_errors_name_the_file(tmp_path):
    with pytest.raises(InputError, match="missing.yaml"):
        config_from_yaml(Toy, tmp_path / "missing.yaml")
    path = tmp_path / "bad.yaml"
    path.write_text("wide:\n  width: 4\n  depth: 2\n")
    with pytest.raises(InputError, match="bad.yaml"):
        config_from_yaml(Toy, path, "wide")
    path.write_text("base:\n  width: 4\n")  # base is the dataclass defaults: an entry could only repeat or hide them
    with pytest.raises(InputError, match="takes no entry"):
        config_from_yaml(Toy, path)


def test_every_registered_method_has_a_config_and_a_preset_file():
    assert sorted(CONFIGS) == sorted(METHODS)
    for method in METHODS:
        assert method_preset_file(method).is_file()
        assert resolve_method_config(method) == method_config_class(method)()
    with pytest.raises(ValueError, match="'byol'"):
        resolve_method_config("byol")


METHOD_PRESETS = [(m, p) for m in sorted(METHODS) for p in preset_names(method_preset_file(m)) if p != BASE_PRESET]


@pytest.mark.parametrize("method,preset", METHOD_PRESETS)
def test_presets_name_only_fields_they_change(method, preset):
    """Every preset loads, and each field it names differs from the dataclass default (no repeated defaults)."""
    named = set(OmegaConf.load(method_preset_file(method))[preset])
    config = resolve_method_config(method, preset)
    assert named and set(changed_fields(config)) == named


def test_overrides_win_over_the_preset():
    config = resolve_method_config("alice", "original", roi_size=[96, 96, 96], casa_input="tokens")
    assert changed_fields(config) == {
        k: v for k, v in changed_fields(resolve_method_config("alice", "original")).items()
        if k not in ("roi_size", "casa_input")
    }


def test_the_resolved_values_are_logged_one_line_per_changed_field(caplog):
    config = resolve_method_config("dira", "official", backbone_size="tiny")
    with caplog.at_level(logging.INFO, logger="medssl3d.methods.presets"):
        log_method_config("dira", "official", config)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "dira: preset 'official', 3 field(s) differ from the DiraConfig defaults"
    assert sorted(lines[1:]) == [
        "dira: backbone_size = 'tiny'", "dira: disc_variant = 'official'", "dira: distortion = 'exclusive'"
    ]
