"""Benchmark suites: named presets of ``configs/bench/<kind>.yaml`` (``smoke`` for a CPU, ``full`` for a GPU)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from medssl3d.jobs.bundles import resource_dir
from medssl3d.methods.presets import config_from_yaml

SUITE_DIR = resource_dir("configs") / "bench"

SuiteT = TypeVar("SuiteT")


def suite_file(kind: str, suite: str) -> tuple[Path, str]:
    """Where a suite lives, as ``(YAML file, preset name)``.

    ``"smoke"`` is preset ``smoke`` of ``configs/bench/<kind>.yaml``; ``"path/to/file.yaml:name"`` is that
    file's preset ``name``.
    """
    if ":" in suite and suite.rsplit(":", 1)[0].endswith((".yaml", ".yml")):
        path, name = suite.rsplit(":", 1)
        return Path(path), name
    return SUITE_DIR / f"{kind}.yaml", suite


def load_suite(config_cls: type[SuiteT], kind: str, suite: str, overrides: Sequence[str] = ()) -> SuiteT:
    """The typed suite config, with ``key=value`` overrides (OmegaConf dot-list) applied last.

    Raises:
        InputError: the suite file is missing or its preset does not fit ``config_cls``.
        ValueError: an unknown suite name or a bad override.
    """
    path, name = suite_file(kind, suite)
    try:
        values = OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as e:
        raise ValueError(f"bad override in {list(overrides)}: {e}") from e
    return config_from_yaml(config_cls, path, preset=name, **values)
