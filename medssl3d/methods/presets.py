"""Typed method configs from keyword arguments (bundles) or from a YAML preset file (``configs/methods``)."""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from medssl3d.data.errors import InputError

ConfigT = TypeVar("ConfigT")


def config_from_kwargs(config_cls: type[ConfigT], **values: Any) -> ConfigT:
    """Build a frozen config dataclass from keyword values, refusing unknown fields by name.

    Raises:
        ValueError: an unknown field (all known ones are listed) or a bad value.
    """
    known = {f.name for f in fields(config_cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {config_cls.__name__} fields {unknown}; known: {sorted(known)}")
    return config_cls(**values)


def config_from_yaml(
    config_cls: type[ConfigT], path: str | os.PathLike, preset: str = "base", **overrides: Any
) -> ConfigT:
    """Read one preset (a top-level key) of a method's YAML file into its config dataclass.

    Args:
        config_cls: the method's frozen config dataclass (the schema: unknown keys and wrong types are refused).
        path: the YAML file, e.g. ``configs/methods/ace.yaml``.
        preset: the preset name, e.g. "base" or "tiny".
        **overrides: field values that win over the preset.

    Raises:
        InputError: the file is missing, or the preset has an unknown key or a wrongly typed value.
        ValueError: an unknown preset or a bad override.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(path, "method preset file not found")
    presets = OmegaConf.load(path)
    if preset not in presets:
        raise ValueError(f"unknown {config_cls.__name__} preset {preset!r}; {path} has {sorted(presets)}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(config_cls), presets[preset])
    except OmegaConfBaseException as e:
        raise InputError(path, f"bad preset {preset!r}: {e}") from e
    try:
        merged = OmegaConf.merge(merged, overrides)
    except OmegaConfBaseException as e:
        names = ", ".join(f.name for f in fields(config_cls))
        raise ValueError(f"bad {config_cls.__name__} override {overrides}: {e} (fields: {names})") from e
    return OmegaConf.to_object(merged)
