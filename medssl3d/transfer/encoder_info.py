"""Encoders that describe themselves: what was pretrained, how, on what, stored inside the weights file.

An exported encoder file is ``{"state_dict": {MONAI keys: tensors}, "medssl3d_encoder": info}``, where
``info`` (:func:`describe_encoder`, from the run's :func:`encoder_run_info`) names the method, the backbone
family and size with its width, the crop, the preprocessing preset (modality, spacing, intensity mapping),
the optimizer steps, which network was exported (the EMA teacher or the student) and the medssl3d version.
MONAI users load
``torch.load(f)["state_dict"]``; :func:`medssl3d.transfer.export.export_weights` reads both this form and
a plain state dict. The segmentation bundle configures itself from ``info`` (:func:`encoder_setting`) and
refuses an encoder that cannot fit the network or the data it is asked to work on
(:func:`fitting_encoder`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

import medssl3d
from medssl3d.data.atomic_files import atomic_torch_save
from medssl3d.data.presets import PresetConfig
from medssl3d.engine.distributed import is_main_process
from medssl3d.networks.backbones import BACKBONE_SIZES
from medssl3d.transfer.export import ENCODER_INFO_KEY, STATE_DICT_KEY, load_weights_file

logger = logging.getLogger(__name__)

__all__ = ["EXPORT_SOURCES", "describe_encoder", "encoder_run_info", "encoder_setting", "export_encoder",
           "fitting_encoder", "read_encoder_info", "save_encoder"]

EXPORT_SOURCES = ("teacher", "student")
"""Which network of a method an export hands over: the EMA teacher (where the method has one) or the student."""
TEACHER_START_WARNING = 0.5
"""An exported teacher that still gives its untrained start more weight than this is warned about."""
FAMILY_BY_TARGET = {"swinunetr": "swin", "unetr": "vit"}
PRESET_FIELDS = ("modality", "spacing", "axcodes", "scaling", "a_min", "a_max", "b_min", "b_max",
                 "lower_percentile", "upper_percentile")
"""The preset fields an encoder records: what a voxel meant to it."""


def encoder_run_info(
    *, method: str, export_target: str, backbone_size: str, roi_size: Sequence[int], preset: PresetConfig
) -> dict[str, Any]:
    """What a pretraining run knows up front about the encoder it will hand over (plain types).

    The engine keeps it in every checkpoint (``Pretrainer(run_info=...)``), so an export from any
    checkpoint can describe itself.

    Args:
        method: the pretraining method's name, e.g. ``"alice"``.
        export_target: ``"swinunetr"`` or ``"unetr"``.
        backbone_size: ``"tiny"``, ``"small"`` or ``"base"``.
        roi_size: the pretraining crop ``(R, A, S)`` in voxels.
        preset: the preprocessing the encoder is pretrained on.

    Raises:
        ValueError: an unknown target or size.
    """
    if export_target not in FAMILY_BY_TARGET:
        raise ValueError(f"export_target must be one of {sorted(FAMILY_BY_TARGET)}, got {export_target!r}")
    family = FAMILY_BY_TARGET[export_target]
    if backbone_size not in BACKBONE_SIZES[family]:
        raise ValueError(f"backbone_size must be one of {sorted(BACKBONE_SIZES[family])}, got {backbone_size!r}")
    size = dataclasses.asdict(BACKBONE_SIZES[family][backbone_size])
    return {
        "method": str(method),
        "export_target": export_target,
        "backbone": family,
        "backbone_size": backbone_size,
        "width": {k: (list(v) if isinstance(v, tuple) else v) for k, v in size.items()},
        "roi_size": [int(r) for r in roi_size],
        "preset": {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(preset).items()
            if k in PRESET_FIELDS
        },
    }


def describe_encoder(run_info: Mapping[str, Any], *, steps: int, source: str) -> dict[str, Any]:
    """The description saved with an exported encoder: the run's facts, its steps, the network exported.

    Args:
        run_info: from :func:`encoder_run_info`.
        steps: optimizer steps of the pretraining run.
        source: ``"teacher"`` or ``"student"``.

    Raises:
        ValueError: an unknown source, or ``run_info`` without the run's facts.
    """
    if source not in EXPORT_SOURCES:
        raise ValueError(f"export source must be one of {EXPORT_SOURCES}, got {source!r}")
    missing = sorted({"method", "export_target", "width", "roi_size", "preset"} - set(run_info))
    if missing:
        raise ValueError(f"run_info lacks {missing}: build it with encoder_run_info()")
    return {**run_info, "steps": int(steps), "source": source, "medssl3d_version": medssl3d.__version__}


def export_encoder(
    trainer: Any, path: str | os.PathLike, *, target: str, source: str | None = None
) -> Path | None:
    """Save the encoder of a finished pretraining run, described where the run has ``run_info``.

    Rank 0 writes; other ranks get ``None``. A run without ``run_info`` (an export target the segmentation
    bundle does not take, e.g. DiRA's ``basicunet``) is saved as a plain state dict.

    Args:
        trainer: the run's :class:`~medssl3d.engine.trainer.Pretrainer`.
        path: the encoder file to write.
        target: ``"swinunetr"``, ``"unetr"`` (or another target the method exports to).
        source: ``"teacher"`` / ``"student"``; ``None``: the method's default (the EMA teacher where it has one).
            A teacher's description holds ``teacher_start_share``, the weight its initial state still has
            (:meth:`~medssl3d.engine.trainer.Pretrainer.teacher_start_share`); above
            :data:`TEACHER_START_WARNING` the export warns.
    """
    if not is_main_process():
        return None
    method = trainer.method
    source = source or method.default_export_source()
    state = method.export_state_dict(target, source=source)
    share = trainer.teacher_start_share() if source == "teacher" else None
    if share is not None and share > TEACHER_START_WARNING:
        logger.warning(
            "the exported teacher is an EMA that still gives %.0f %% of its weight to its initial (untrained) state "
            "after %d steps: a longer run, or the student (export source 'student'), hands over more of what was "
            "learned", 100 * share, trainer.step,
        )
    if not trainer.run_info:
        return atomic_torch_save(dict(state), path)
    info = describe_encoder(trainer.run_info, steps=trainer.step, source=source)
    if share is not None:
        info["teacher_start_share"] = share
    return save_encoder(state, path, info)


def save_encoder(state: Mapping[str, Tensor], path: str | os.PathLike, info: Mapping[str, Any]) -> Path:
    """Write ``{"state_dict": state, "medssl3d_encoder": info}`` atomically; returns the path."""
    return atomic_torch_save({STATE_DICT_KEY: dict(state), ENCODER_INFO_KEY: dict(info)}, path)


def read_encoder_info(path: str | os.PathLike | None) -> dict[str, Any] | None:
    """The description inside an encoder file; ``None`` for no path or a file without one (a plain state dict).

    Raises:
        ValueError: the file does not exist or holds no dict.
    """
    if not path:
        return None
    info = load_weights_file(path).get(ENCODER_INFO_KEY)
    return dict(info) if isinstance(info, Mapping) else None


def encoder_setting(info: Mapping[str, Any] | None, name: str, default: Any) -> Any:
    """A segmentation-bundle setting taken from the encoder's description, else ``default``.

    ``name`` is one of ``backbone_size``, ``feature_size``, ``vit_hidden_size``, ``vit_mlp_dim``,
    ``vit_num_heads``, ``roi_size``, ``modality``, ``spacing_mm``, ``arch``.

    Raises:
        ValueError: an unknown ``name``.
    """
    if name not in _SETTINGS:
        raise ValueError(f"unknown encoder setting {name!r}; known: {sorted(_SETTINGS)}")
    if not info:
        return default
    value = _SETTINGS[name](info)
    return default if value is None else value


_SETTINGS = {
    "arch": lambda info: info["export_target"],
    "backbone_size": lambda info: info.get("backbone_size"),
    "feature_size": lambda info: info["width"].get("feature_size"),
    "vit_hidden_size": lambda info: info["width"].get("hidden_size"),
    "vit_mlp_dim": lambda info: info["width"].get("mlp_dim"),
    "vit_num_heads": lambda info: info["width"].get("num_heads"),
    "roi_size": lambda info: list(info["roi_size"]),
    "modality": lambda info: info["preset"]["modality"],
    "spacing_mm": lambda info: list(info["preset"]["spacing"]),
}


def fitting_encoder(
    path: str | os.PathLike | None,
    info: Mapping[str, Any] | None,
    *,
    arch: str,
    feature_size: int,
    vit_hidden_size: int,
    modality: str,
    spacing_mm: float | Sequence[float] | None,
    roi_size: Sequence[int],
    backbone_size: str | None = None,
) -> str | os.PathLike | None:
    """``path`` itself, once its encoder is known to serve the segmentation network and data it is set up for.

    The network (``arch`` and width) and the modality must be the encoder's: anything else is an error in
    one line naming the setting and both values. Another crop or spacing is allowed (the same anatomy at
    another scale) and logged as a warning. A file without a description (``info`` None) passes: the weight
    loader still counts every tensor by name and shape.

    Args:
        path: the encoder file (``""`` or ``None``: scratch).
        info: its description (:func:`read_encoder_info`).
        arch: the bundle's ``arch``.
        feature_size: the bundle's ``feature_size`` (SwinUNETR width).
        vit_hidden_size: the bundle's ``vit_hidden_size`` (UNETR width).
        modality: the bundle's ``modality``.
        spacing_mm: the bundle's ``spacing_mm`` (``None``: the encoder's).
        roi_size: the bundle's ``roi_size``.
        backbone_size: the bundle's ``backbone_size`` (``None``: only the widths are compared).

    Raises:
        ValueError: ``"<file>: encoder pretrained with <setting>=<a> (<method>), the bundle sets <setting>=<b>"``.
    """
    if not path or info is None:
        return path
    setting, key, wanted = (
        ("feature_size", "feature_size", feature_size) if arch == "swinunetr"
        else ("vit_hidden_size", "hidden_size", vit_hidden_size)
    )
    required = [("arch", info["export_target"], arch)]
    if backbone_size is not None and info.get("backbone_size") is not None:
        required.append(("backbone_size", info["backbone_size"], backbone_size))
    required += [(setting, info["width"].get(key), wanted),
                 ("modality", str(info["preset"]["modality"]).lower(), str(modality).lower())]
    for name, theirs, ours in required:
        if theirs != ours:
            raise ValueError(
                f"{path}: encoder pretrained with {name}={theirs!r} ({info['method']}), the bundle sets {name}={ours!r}"
            )
    spacing = list(info["preset"]["spacing"]) if spacing_mm is None else (
        [float(spacing_mm)] * 3 if isinstance(spacing_mm, (int, float)) else [float(s) for s in spacing_mm])
    for name, theirs, ours in (("spacing_mm", list(info["preset"]["spacing"]), spacing),
                               ("roi_size", list(info["roi_size"]), [int(r) for r in roi_size])):
        if theirs != ours:
            logger.warning("%s: encoder pretrained with %s=%s, fine-tuning with %s=%s", path, name, theirs, name, ours)
    return path
