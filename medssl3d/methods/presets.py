"""Typed method configs: dataclass defaults, then a YAML preset (``configs/methods/<method>.yaml``), then overrides.

Each method's frozen config dataclass holds every setting's default; preset ``"base"`` is those defaults and has
no YAML entry, and every other preset names only the fields it changes. :func:`resolve_method_config` is the one
place a method's settings are resolved, for the method builders (a bundle's ``method_preset`` id) and for
``medssl3d pretrain --preset``.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from medssl3d.data.errors import InputError

logger = logging.getLogger(__name__)

ConfigT = TypeVar("ConfigT")

BASE_PRESET = "base"
"""The preset that is the config dataclass's defaults; a YAML file has no entry of that name."""
CONFIGS: dict[str, str] = {
    "ace": "medssl3d.methods.ace:AceConfig",
    "afire": "medssl3d.methods.afire:AfireConfig",
    "alice": "medssl3d.methods.alice:AliceConfig",
    "dira": "medssl3d.methods.dira:DiraConfig",
    "swin_ssl": "medssl3d.methods.swin_ssl:SwinSSLConfig",
}
"""Each registered method's config dataclass (``"module:class"``, imported on first use)."""


def config_from_yaml(
    config_cls: type[ConfigT], path: str | os.PathLike, preset: str = BASE_PRESET, **overrides: Any
) -> ConfigT:
    """Read one preset (a top-level key) of a YAML file over the defaults of its config dataclass.

    Args:
        config_cls: the frozen config dataclass (the schema: unknown keys and wrong types are refused).
        path: the YAML file, e.g. ``configs/methods/ace.yaml``.
        preset: the preset name, e.g. "tiny"; ``"base"`` is the dataclass defaults (the file has no such entry).
        **overrides: field values that win over the preset, converted to the fields' types (``"0.5"`` to a float).

    Raises:
        InputError: the file is missing or has a ``base`` entry, or the preset has an unknown key or a wrongly
            typed value.
        ValueError: an unknown preset, or an unknown or badly typed override.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(path, "preset file not found")
    presets = OmegaConf.load(path)
    if BASE_PRESET in presets:
        raise InputError(path, f"preset {BASE_PRESET!r} is the {config_cls.__name__} defaults and takes no entry")
    if preset != BASE_PRESET and preset not in presets:
        raise ValueError(f"unknown {config_cls.__name__} preset {preset!r}; {path} has {preset_names(path)}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(config_cls), presets.get(preset, {}))
    except OmegaConfBaseException as e:
        raise InputError(path, f"bad preset {preset!r}: {e}") from e
    _refuse_unknown_fields(config_cls, overrides)
    try:
        merged = OmegaConf.merge(merged, overrides)
    except OmegaConfBaseException as e:
        raise ValueError(f"bad {config_cls.__name__} override {overrides}: {e}") from e
    return OmegaConf.to_object(merged)


def _refuse_unknown_fields(config_cls: type, values: Any) -> None:
    known = {f.name for f in fields(config_cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {config_cls.__name__} fields {unknown}; known: {sorted(known)}")


def preset_names(path: str | os.PathLike) -> list[str]:
    """The presets of a YAML preset file: ``"base"`` and its top-level keys, sorted."""
    return sorted({BASE_PRESET, *OmegaConf.load(Path(path).expanduser())})


def method_config_class(method: str) -> type:
    """The config dataclass of registered method ``method``.

    Raises:
        ValueError: ``method`` is not a registered method.
    """
    if method not in CONFIGS:
        raise ValueError(f"unknown method {method!r}; registered: {sorted(CONFIGS)}")
    module, name = CONFIGS[method].split(":")
    return getattr(importlib.import_module(module), name)


def resolve_method_config(method: str, preset: str = BASE_PRESET, **overrides: Any) -> Any:
    """A method's config: its dataclass defaults, then a preset of its YAML shipped in the package, then overrides.

    Args:
        method: a registered method, e.g. ``"alice"``.
        preset: a preset of ``configs/methods/<method>.yaml``, e.g. ``"original"``; ``"base"``: the defaults.
        **overrides: config fields that win over the preset (a bundle's explicit ids), given to the dataclass as
            they are (its ``__post_init__`` checks and normalises them, e.g. an ``int`` crop to a cube).

    Raises:
        InputError: the preset file is missing or malformed.
        ValueError: an unknown method, preset, field or a bad value.
    """
    from medssl3d.jobs.bundles import method_preset_file

    config_cls = method_config_class(method)
    _refuse_unknown_fields(config_cls, overrides)
    return replace(config_from_yaml(config_cls, method_preset_file(method), preset), **overrides)


def changed_fields(config: Any) -> dict[str, Any]:
    """The fields of a config dataclass instance whose value differs from the dataclass default, in field order."""
    default = type(config)()
    return {
        f.name: getattr(config, f.name) for f in fields(config) if getattr(config, f.name) != getattr(default, f.name)
    }


def log_method_config(method: str, preset: str, config: Any) -> None:
    """Log (INFO) the preset a method is built from and one line per field that differs from the defaults."""
    changed = changed_fields(config)
    logger.info(
        "%s: preset %r, %d field(s) differ from the %s defaults", method, preset, len(changed), type(config).__name__
    )
    for name, value in changed.items():
        logger.info("%s: %s = %r", method, name, value)
