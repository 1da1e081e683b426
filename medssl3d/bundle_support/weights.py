"""Check that a bundle's ``models/model.pt`` is the network its configs build, counting tensors.

MONAI Label (like ``copy_model_state``) loads ``model.pt`` with ``strict=False``: weights of another size
or architecture load partly or not at all, silently, and the server serves a random network. This check
builds ``network_def`` from the bundle's own config and counts the tensors that match by name and shape.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medssl3d.data.errors import InputError

MODEL_FILE = Path("models") / "model.pt"
NETWORK_ID = "network_def"
#: Keys a checkpoint may nest the network's weights under (MONAI ``CheckpointSaver`` with several objects).
STATE_KEYS = ("model", "state_dict", "network")
MAX_LISTED_KEYS = 5


@dataclass
class WeightsReport:
    """Tensors of ``model.pt`` against the bundle's network, matched by name and shape."""

    matched: int
    total: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatches: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every network tensor is in the file with its shape, and the file holds nothing else."""
        return self.matched == self.total and not self.unexpected

    def summary(self) -> str:
        """E.g. ``matched 12/159 tensors; 147 missing e.g. [...]; 3 unexpected e.g. [...]``."""
        parts = [f"matched {self.matched}/{self.total} tensors"]
        for label, items in (("missing", self.missing), ("unexpected", self.unexpected),
                             ("with another shape", self.shape_mismatches)):
            if items:
                parts.append(f"{len(items)} {label} e.g. {items[:MAX_LISTED_KEYS]}")
        return "; ".join(parts)


def _state_dict(obj: object, path: Path) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in STATE_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                return obj[key]
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise InputError(path, f"not a state dict (a mapping of tensors, or one under {list(STATE_KEYS)})")


def compare_weights(network: torch.nn.Module, weights: Mapping[str, torch.Tensor]) -> WeightsReport:
    """Count the tensors of ``weights`` that fit ``network`` by name and shape."""
    target = network.state_dict()
    mismatches = [
        (k, tuple(v.shape), tuple(target[k].shape))
        for k, v in weights.items() if k in target and tuple(v.shape) != tuple(target[k].shape)
    ]
    bad = {k for k, _, _ in mismatches}
    matched = [k for k in weights if k in target and k not in bad]
    return WeightsReport(
        matched=len(matched),
        total=len(target),
        missing=[k for k in target if k not in weights],
        unexpected=[k for k in weights if k not in target],
        shape_mismatches=mismatches,
    )


def check_bundle_weights(
    bundle: str | os.PathLike, config: str = "inference.json", overrides: Mapping | None = None
) -> WeightsReport:
    """Build the bundle's ``network_def`` and check ``models/model.pt`` against it.

    Args:
        bundle: the bundle folder.
        config: the config (under ``configs/``) whose ``network_def`` the server builds.
        overrides: config ids to set before building (none for a bundle as MONAI Label would read it).

    Returns:
        The report of a full match.

    Raises:
        InputError: ``model.pt`` is missing, unreadable or does not match the network (the message has the
            counts and names the first missing / unexpected tensors).
    """
    from monai.bundle import ConfigParser

    bundle = Path(bundle)
    model_path = bundle / MODEL_FILE
    if not model_path.is_file():
        raise InputError(model_path, "missing: a served bundle needs its fine-tuned weights")
    parser = ConfigParser()
    parser.read_meta(str(bundle / "configs" / "metadata.json"))
    parser.read_config(str(bundle / "configs" / config))
    parser["bundle_root"] = str(bundle)
    for key, value in (overrides or {}).items():
        parser[key] = value
    network = parser.get_parsed_content(NETWORK_ID, instantiate=True)
    try:
        loaded = torch.load(model_path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a corrupt or foreign file
        raise InputError(model_path, f"cannot be read as PyTorch weights: {e}") from e
    report = compare_weights(network, _state_dict(loaded, model_path))
    if not report.ok:
        raise InputError(
            model_path,
            f"does not match the {type(network).__name__} that configs/{config} builds: {report.summary()}",
        )
    return report
