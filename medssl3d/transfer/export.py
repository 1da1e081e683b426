"""Hand a pretrained encoder to MONAI ``SwinUNETR`` / ``UNETR``: export, save, load with counts.

A pretraining checkpoint is ``{"method": name, "backbone": name, "model": method_state_dict, ...}``;
the student backbone's tensors live in ``"model"`` under :data:`STUDENT_BACKBONE_PREFIX`, and
a backbone's own keys are the wrapped MONAI network's keys under ``net.`` (see
:mod:`medssl3d.networks.backbones`), so export is a prefix rewrite and loading counts names and
shapes instead of trusting ``strict=False``.

Weights users already hold load the same way: MONAI's published Swin UNETR self-supervised weights
(``model_swinvit.pt`` of Project-MONAI research-contributions ``SwinUNETR/Pretrain``, the file
``SwinUNETR.load_from`` reads) are recognised by their layout, ``{"state_dict": {"module.<SSLHead key>": ...}}``
with the SwinViT keys at the top (``module.patch_embed.proj.weight``, ``module.layers1.0.blocks.0.mlp.fc1.weight``),
and mapped to ``swinViT.*`` keys; their pretraining heads (``rotation_head``, ``contrastive_head``, ``conv``)
are dropped and reported.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from medssl3d.data.atomic_files import atomic_torch_save
from medssl3d.engine.checkpoint import EXPORT_SOURCE_KEY
from medssl3d.networks.backbones import EXPORT_TARGETS, NET_PREFIX, to_target_keys

logger = logging.getLogger(__name__)

__all__ = [
    "ENCODER_INFO_KEY",
    "STATE_DICT_KEY",
    "STUDENT_BACKBONE_PREFIX",
    "ImportedWeights",
    "LoadReport",
    "export_weights",
    "import_weights",
    "is_monai_ssl_layout",
    "load_weights_file",
    "load_pretrained",
    "load_pretrained_into",
    "save_weights",
]

STUDENT_BACKBONE_PREFIX = "student.backbone."
"""Where an ``SSLMethod``'s state dict keeps the student backbone (``method.student.backbone``)."""
BACKBONE_PREFIXES = {"student": STUDENT_BACKBONE_PREFIX, "teacher": "teacher.backbone."}
"""Where a method's state dict keeps each network's backbone (the teacher is the EMA copy, where there is one)."""
CHECKPOINT_MODEL_KEY = "model"
"""The key of a pretraining checkpoint that holds the method's state dict."""
STATE_DICT_KEY = "state_dict"
"""The key of an encoder file (:mod:`medssl3d.transfer.encoder_info`) that holds the exported tensors."""
ENCODER_INFO_KEY = "medssl3d_encoder"
"""The key of an encoder file that holds its description."""
MAX_LISTED_KEYS = 5
"""How many offending keys an error message quotes before summarising the rest."""
MONAI_SSL_PREFIX = "module."
"""Prefix of every key of MONAI's published SSL weights (saved from ``DataParallel``)."""
MONAI_SSL_ENCODER_STARTS = ("patch_embed.", "layers")
"""SwinViT keys of MONAI's published SSL weights: the patch embedding and the stages ``layers1``..``layers4``."""
MONAI_SSL_RENAMES = ((".mlp.fc1.", ".mlp.linear1."), (".mlp.fc2.", ".mlp.linear2."))
"""The SSL weights' MLP layer names -> MONAI ``MLPBlock`` names (as ``SwinTransformerBlock.load_from`` maps them)."""
LAYOUT_MEDSSL3D = "medssl3d"
LAYOUT_MONAI_SSL = "monai_ssl"

WeightsLike = str | os.PathLike | Mapping[str, Tensor]


def load_weights_file(path: str | os.PathLike) -> Mapping:
    """A weights file or checkpoint read with ``weights_only=True``; ``ValueError`` naming a missing or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"weights file {str(path)!r} does not exist")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, Mapping):
        raise ValueError(f"weights file {str(path)!r} holds a {type(obj).__name__}, not a state dict")
    return obj


def is_monai_ssl_layout(keys: list[str]) -> bool:
    """True for the key layout of MONAI's published Swin UNETR SSL weights (``module.patch_embed.proj.weight``, ...)."""
    return bool(keys) and all(k.startswith(MONAI_SSL_PREFIX) for k in keys) and any(
        k.startswith(MONAI_SSL_PREFIX + MONAI_SSL_ENCODER_STARTS[0]) for k in keys
    )


def _from_monai_ssl(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """MONAI SSL weights as SwinUNETR ``swinViT.*`` tensors, and the keys dropped (the pretraining heads)."""
    encoder, dropped = {}, []
    for key, value in state.items():
        name = key[len(MONAI_SSL_PREFIX) :]
        if not name.startswith(MONAI_SSL_ENCODER_STARTS):
            dropped.append(key)
            continue
        for old, new in MONAI_SSL_RENAMES:
            name = name.replace(old, new)
        encoder[EXPORT_TARGETS["swinunetr"].encoder_prefix + name] = value.detach().cpu()
    return encoder, dropped


def _head_names(dropped: list[str]) -> list[str]:
    """``["conv", "rotation_head", ...]``: the modules the dropped keys belong to."""
    return sorted({k[len(MONAI_SSL_PREFIX) :].split(".", 1)[0] for k in dropped})


def _infer_target(keys: list[str]) -> str:
    """Target of already-exported keys, or of backbone keys (``net.*``)."""
    for name, spec in EXPORT_TARGETS.items():
        if any(k.startswith(spec.encoder_prefix) for k in keys):
            return name
    backbone_keys = [k[len(NET_PREFIX) :] for k in keys if k.startswith(NET_PREFIX)]
    if any(k.startswith(EXPORT_TARGETS["swinunetr"].encoder_prefix) for k in backbone_keys):
        return "swinunetr"
    if backbone_keys:
        return "unetr"
    raise ValueError(
        "cannot tell which network these weights belong to: no 'swinViT.', 'vit.' or backbone 'net.' keys "
        f"(first keys: {keys[:MAX_LISTED_KEYS]})"
    )


@dataclass(frozen=True)
class ImportedWeights:
    """Weights keyed for a MONAI network, with where they came from.

    Attributes:
        state: the tensors, keyed as the target network's state dict.
        layout: :data:`LAYOUT_MEDSSL3D` (a medssl3d checkpoint, backbone or export) or :data:`LAYOUT_MONAI_SSL`
            (MONAI's published Swin UNETR SSL weights).
        dropped: source keys that belong to no network of the target (the SSL weights' pretraining heads).
    """

    state: dict[str, Tensor]
    layout: str = LAYOUT_MEDSSL3D
    dropped: list[str] = field(default_factory=list)


def export_weights(
    checkpoint_or_state: WeightsLike, target: str | None = None, source: str = "student"
) -> dict[str, Tensor]:
    """Target-keyed encoder weights from a checkpoint or a state dict.

    Args:
        checkpoint_or_state: a path to a pretraining checkpoint or a saved state dict (read
            with ``weights_only=True``), or an in-memory dict: a checkpoint
            (``{"model": method_state, ...}``), a method state dict (student backbone under
            ``student.backbone.``), a backbone state dict (``net.*``), an already exported
            dict (``swinViT.*`` / ``vit.*``, passed through), plain or inside an encoder file
            (``{"state_dict": ..., "medssl3d_encoder": ...}``), or MONAI's published Swin UNETR SSL
            weights (``model_swinvit.pt``: ``{"state_dict": {"module.patch_embed.proj.weight": ...}}``).
        target: ``"swinunetr"`` or ``"unetr"``; ``None`` infers it from the keys.
        source: which backbone of a checkpoint or method state dict: ``"student"`` or ``"teacher"``.

    Returns:
        A state dict loadable into MONAI ``SwinUNETR`` (``swinViT.*`` [+ ``encoder*``/``decoder*``])
        or ``UNETR`` (``vit.*``); never SwinUNETR's ``out.`` conv nor the SSL weights' heads.

    Raises:
        ValueError: for a missing/unreadable file, unrecognisable keys, weights of the other family, an
            unknown ``source``, or a method state dict without that backbone.
    """
    return import_weights(checkpoint_or_state, target, source).state


def default_source(checkpoint: Mapping[str, Any]) -> str:
    """What an export hands over when not told: what the method said when the checkpoint was written.

    The engine records :meth:`~medssl3d.methods.base.SSLMethod.default_export_source` in every checkpoint
    (``export_source``); for an older checkpoint, the EMA teacher where it keeps one, else the student.
    """
    if checkpoint.get(EXPORT_SOURCE_KEY) in BACKBONE_PREFIXES:
        return str(checkpoint[EXPORT_SOURCE_KEY])
    model = checkpoint.get(CHECKPOINT_MODEL_KEY, checkpoint)
    teacher = BACKBONE_PREFIXES["teacher"]
    return "teacher" if isinstance(model, Mapping) and any(str(k).startswith(teacher) for k in model) else "student"


def import_weights(
    checkpoint_or_state: WeightsLike, target: str | None = None, source: str = "student"
) -> ImportedWeights:
    """:func:`export_weights` with the layout it recognised and the source tensors it dropped.

    Raises:
        ValueError: as :func:`export_weights`.
    """
    if source not in BACKBONE_PREFIXES:
        raise ValueError(f"source must be one of {sorted(BACKBONE_PREFIXES)}, got {source!r}")
    state = (
        load_weights_file(checkpoint_or_state)
        if isinstance(checkpoint_or_state, (str, os.PathLike))
        else checkpoint_or_state
    )
    for wrapper in (CHECKPOINT_MODEL_KEY, STATE_DICT_KEY):
        if wrapper in state and isinstance(state[wrapper], Mapping):
            state = state[wrapper]
    if is_monai_ssl_layout(list(state)):
        if target not in (None, "swinunetr"):
            raise ValueError(f"MONAI's Swin UNETR SSL weights are for 'swinunetr', not for target {target!r}")
        encoder, dropped = _from_monai_ssl(state)
        logger.info(
            "MONAI Swin UNETR SSL weights (model_swinvit.pt layout): %d SwinViT tensors; %d tensors of the "
            "pretraining heads %s dropped", len(encoder), len(dropped), _head_names(dropped),
        )
        return ImportedWeights(encoder, LAYOUT_MONAI_SSL, dropped)
    if any(k.startswith(STUDENT_BACKBONE_PREFIX) for k in state):
        prefix = BACKBONE_PREFIXES[source]
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not state:
            raise ValueError(f"the method's state dict has no {source} backbone ({prefix}*)")
    keys = list(state)
    inferred = _infer_target(keys)
    if target is None:
        target = inferred
    elif target not in EXPORT_TARGETS:
        raise ValueError(f"unknown export target {target!r}; expected one of {sorted(EXPORT_TARGETS)}")
    elif target != inferred:
        raise ValueError(f"weights are for {inferred!r}, not for target {target!r}")
    spec = EXPORT_TARGETS[target]
    if any(k.startswith(spec.encoder_prefix) for k in keys):  # already exported
        return ImportedWeights({k: v.detach().cpu() for k, v in state.items() if not k.startswith("out.")})
    return ImportedWeights(to_target_keys(state, target))


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_pretrained` loaded, counted by name and shape.

    Attributes:
        matched: tensors loaded (same name and shape in source and target).
        total_target: tensors in the target's state dict.
        missing_encoder: encoder keys (``swinViT.`` / ``vit.``) of the target that did not load.
        unexpected: source keys the target does not have (skipped).
        shape_mismatches: ``(key, source shape, target shape)`` for same-named tensors (skipped).
        encoder_matched: loaded encoder tensors.
        encoder_total: encoder tensors in the target.
        decoder_matched: loaded non-encoder tensors.
        decoder_total: non-encoder tensors in the target (SwinUNETR's ``out`` conv included).
        layout: the source's layout (:data:`LAYOUT_MEDSSL3D` or :data:`LAYOUT_MONAI_SSL`).
        dropped: source keys of no network of the target, dropped before matching (the SSL weights' heads).
    """

    matched: int
    total_target: int
    missing_encoder: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatches: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    encoder_matched: int = 0
    encoder_total: int = 0
    decoder_matched: int = 0
    decoder_total: int = 0
    layout: str = LAYOUT_MEDSSL3D
    dropped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: ``loaded N/M tensors (encoder E/E, decoder K/L)`` plus what was skipped."""
        line = (
            f"loaded {self.matched}/{self.total_target} tensors (encoder {self.encoder_matched}/"
            f"{self.encoder_total}, decoder {self.decoder_matched}/{self.decoder_total})"
        )
        if self.layout == LAYOUT_MONAI_SSL:
            heads = _head_names(self.dropped)
            line += f" from MONAI's Swin UNETR SSL weights; {len(self.dropped)} tensors of its heads {heads} dropped"
        if self.unexpected:
            line += f"; {len(self.unexpected)} unexpected skipped"
        if self.shape_mismatches:
            line += f"; {len(self.shape_mismatches)} shape mismatches skipped"
        return line


def _target_of(net: nn.Module, keys: list[str]) -> str:
    for name, spec in EXPORT_TARGETS.items():
        if any(k.startswith(spec.encoder_prefix) for k in keys):
            return name
    raise ValueError(
        f"{type(net).__name__} has no 'swinViT.' or 'vit.' parameters; expected a MONAI SwinUNETR or UNETR"
    )


def _listed(keys: list) -> str:
    more = f" (+{len(keys) - MAX_LISTED_KEYS} more)" if len(keys) > MAX_LISTED_KEYS else ""
    return f"{keys[:MAX_LISTED_KEYS]}{more}"


def load_pretrained(net: nn.Module, weights: WeightsLike, *, require_full_encoder: bool = True) -> LoadReport:
    """Load encoder (and decoder) weights into a MONAI ``SwinUNETR`` or ``UNETR``, counting.

    Only tensors whose name and shape both match are copied; nothing is loaded when the check
    below fails.

    Args:
        net: a MONAI ``SwinUNETR`` (keys ``swinViT.*``) or ``UNETR`` (keys ``vit.*``).
        weights: anything :func:`export_weights` accepts (path or dict).
        require_full_encoder: raise unless every encoder tensor of ``net`` is loaded.

    Returns:
        The :class:`LoadReport`; its summary is logged at INFO.

    Raises:
        ValueError: when ``require_full_encoder`` and an encoder tensor did not load (the
            message gives the counts and the first missing keys), or for unusable weights.
    """
    target_state = net.state_dict()
    target = _target_of(net, list(target_state))
    imported = import_weights(weights, target)
    source = imported.state
    encoder_prefix = EXPORT_TARGETS[target].encoder_prefix

    loadable, mismatches = {}, []
    for key, value in source.items():
        if key in target_state:
            if tuple(value.shape) == tuple(target_state[key].shape):
                loadable[key] = value
            else:
                mismatches.append((key, tuple(value.shape), tuple(target_state[key].shape)))
    encoder_keys = [k for k in target_state if k.startswith(encoder_prefix)]
    enc_matched = sum(k in loadable for k in encoder_keys)
    report = LoadReport(
        matched=len(loadable),
        total_target=len(target_state),
        missing_encoder=[k for k in encoder_keys if k not in loadable],
        unexpected=[k for k in source if k not in target_state],
        shape_mismatches=mismatches,
        encoder_matched=enc_matched,
        encoder_total=len(encoder_keys),
        decoder_matched=len(loadable) - enc_matched,
        decoder_total=len(target_state) - len(encoder_keys),
        layout=imported.layout,
        dropped=imported.dropped,
    )
    if report.missing_encoder and require_full_encoder:
        raise ValueError(
            f"pretrained encoder did not load fully into {type(net).__name__}: {report.summary()}; "
            f"{len(report.missing_encoder)} encoder tensors missing, e.g. {_listed(report.missing_encoder)}"
            + (f"; shape mismatches {_listed(mismatches)}" if mismatches else "")
        )
    net.load_state_dict(loadable, strict=False)
    logger.info("%s: %s", type(net).__name__, report.summary())
    if mismatches:
        logger.warning("skipped tensors with other shapes: %s", _listed(mismatches))
    return report


def load_pretrained_into(
    net: nn.Module, path: str | os.PathLike | None = None, require_full_encoder: bool = True
) -> nn.Module:
    """Bundle-friendly loader (``_target_``): load ``path`` into ``net`` and return ``net``.

    Args:
        net: a MONAI ``SwinUNETR`` or ``UNETR``.
        path: an exported encoder or a pretraining checkpoint; empty or ``None`` trains from scratch.
        require_full_encoder: see :func:`load_pretrained`.

    Returns:
        ``net`` itself, for chaining in configs.
    """
    if not path:
        logger.info("%s: no pretrained weights given, training from scratch", type(net).__name__)
        return net
    try:
        load_pretrained(net, path, require_full_encoder=require_full_encoder)
    except ValueError as e:
        if str(path) in str(e):
            raise
        raise ValueError(f"{path}: {e}") from e  # name the file: the user passed it
    return net


def save_weights(state: Mapping[str, Tensor], path: str | os.PathLike) -> Path:
    """Save a plain state dict atomically (:func:`~medssl3d.data.atomic_files.atomic_torch_save`).

    Args:
        state: tensors to save (e.g. from :func:`export_weights`).
        path: destination; parent folders are created.

    Returns:
        The destination path.
    """
    return atomic_torch_save(dict(state), path)
