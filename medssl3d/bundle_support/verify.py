"""Offline checks of a MONAI bundle folder: files, metadata schema, logging config, network in/out, labels."""

from __future__ import annotations

import configparser
import logging
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser, verify_metadata, verify_net_in_out

logger = logging.getLogger(__name__)

META_SCHEMA = Path(str(files("medssl3d.resources").joinpath("meta_schema.json")))
REQUIRED_FILES = (
    "configs/metadata.json",
    "configs/logging.conf",
    "configs/train.json",
    "configs/multi_gpu_train.json",
    "configs/smoke.json",
    "docs/README.md",
    "LICENSE",
)
INFERENCE_CONFIG = "configs/inference.json"
# a bundle that serves a model (has inference.json) also ships these, as the MONAI model zoo's do
SERVING_FILES = ("configs/evaluate.json",)
LOGGING_CONFIG = "configs/logging.conf"
# what logging.config.fileConfig (used by `monai.bundle run`) needs: each list section names entries that
# must have their own `<prefix>_<name>` section
LOGGING_SECTIONS = {"loggers": "logger", "handlers": "handler", "formatters": "formatter"}
TRAIN_CONFIG = "configs/train.json"
METADATA = "configs/metadata.json"
CHANNEL_DEF_ID = "_meta_#network_data_format#outputs#pred#channel_def"
NUM_CLASSES_ID = "num_classes"
NETWORK_ID = "network_def"
# "32*n" shapes are checked at n=2 (64 voxels per axis): SwinUNETR's instance norm at its 1/32 bottleneck
# needs more than one voxel, so 32^3 is a shape the network cannot take
DEFAULT_SHAPE_FACTOR = 2


def verify_bundle(
    bundle_dir: str | Path,
    *,
    schema: str | Path = META_SCHEMA,
    check_network: bool = True,
    device: str | None = None,
    shape_factor: int = DEFAULT_SHAPE_FACTOR,
    network_overrides: dict[str, Any] | None = None,
) -> list[str]:
    """List what is wrong with a bundle; an empty list means it passed every check.

    Checks, in order: the files every medssl3d bundle ships (``REQUIRED_FILES``, plus ``SERVING_FILES`` for
    a bundle with ``inference.json``) exist and its JSON configs parse; ``metadata.json`` is valid against
    ``schema`` (MONAI ``verify_metadata`` with the local schema file, so nothing is downloaded) and its
    ``changelog`` has an entry for its ``version`` (the MONAI model zoo's rule); ``logging.conf`` has the
    sections ``logging.config.fileConfig`` needs; a ``num_classes`` in ``train.json`` equals the number of
    classes in the metadata ``channel_def``; and, for bundles with ``inference.json``, MONAI
    ``verify_net_in_out`` runs ``network_def`` on a fake input shaped as the metadata says.

    Args:
        bundle_dir: the bundle root (holding ``configs/``).
        schema: JSON Schema file for the metadata (default: the copy shipped in ``medssl3d.resources``).
        check_network: run ``verify_net_in_out`` when ``inference.json`` exists.
        device: device for the network check (default: ``cuda:0`` if available, else ``cpu``).
        shape_factor: the ``n`` of metadata shapes such as ``"32*n"`` for the network check.
        network_overrides: config id-value pairs for the network check (e.g. ``{"feature_size": 12}``
            to keep it fast).

    Returns:
        One line per problem, each naming the file it concerns.
    """
    root = Path(bundle_dir)
    inference = root / INFERENCE_CONFIG
    required = REQUIRED_FILES + (SERVING_FILES if inference.is_file() else ())
    problems = [f"{root / name}: missing" for name in required if not (root / name).is_file()]
    for config in sorted((root / "configs").glob("*.json")):
        try:
            ConfigParser.load_config_file(config)
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            problems.append(f"{config}: not valid JSON ({e})")
    if problems:
        return problems

    meta_file = root / METADATA
    try:
        verify_metadata(meta_file=str(meta_file), filepath=str(schema), create_dir=False)
    except ValueError as e:
        problems.append(f"{meta_file}: {e}")
        return problems

    problems += _check_changelog(meta_file)
    problems += _check_logging_config(root / LOGGING_CONFIG)
    problems += _check_num_classes(root)
    if check_network and inference.is_file():
        try:
            verify_net_in_out(
                net_id=NETWORK_ID,
                meta_file=str(meta_file),
                config_file=str(inference),
                device=device or ("cuda:0" if torch.cuda.is_available() else "cpu"),
                n=shape_factor,
                **{"bundle_root": str(root), **(network_overrides or {})},
            )
        except (ValueError, KeyError, RuntimeError) as e:
            problems.append(f"{inference}: network input/output check failed ({e})")
    for problem in problems:
        logger.warning(problem)
    return problems


def _check_changelog(meta_file: Path) -> list[str]:
    """The metadata's ``version`` must have a ``changelog`` entry (the schema checks both exist)."""
    meta = ConfigParser.load_config_file(meta_file)
    if meta["version"] not in meta["changelog"]:
        return [f"{meta_file}: version {meta['version']} has no changelog entry"]
    return []


def _check_logging_config(path: Path) -> list[str]:
    """``logging.conf`` must parse and name a section for every logger, handler and formatter it lists."""
    config = configparser.ConfigParser()
    try:
        config.read(path)
    except configparser.Error as e:
        return [f"{path}: not a valid logging config ({e})"]
    problems = []
    for section, prefix in LOGGING_SECTIONS.items():
        if not config.has_option(section, "keys"):
            problems.append(f"{path}: no [{section}] section with keys=")
            continue
        names = [n.strip() for n in config.get(section, "keys").split(",") if n.strip()]
        problems += [f"{path}: no [{prefix}_{n}] section" for n in names if not config.has_section(f"{prefix}_{n}")]
    return problems


def _check_num_classes(root: Path) -> list[str]:
    """``num_classes`` of train.json (when it has one) must equal the metadata's channel count."""
    parser = ConfigParser()
    parser.read_config(root / TRAIN_CONFIG)
    parser.read_meta(root / METADATA)
    parser["bundle_root"] = str(root)
    if NUM_CLASSES_ID not in parser or CHANNEL_DEF_ID not in parser:
        return []
    num_classes = parser.get_parsed_content(NUM_CLASSES_ID)
    channel_def = parser.get_parsed_content(CHANNEL_DEF_ID)
    if num_classes != len(channel_def):
        problem = f"num_classes={num_classes} but metadata channel_def has {len(channel_def)}"
        return [f"{root / TRAIN_CONFIG}: {problem}"]
    return []
