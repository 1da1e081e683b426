"""Swin UNETR self-supervised pretraining: rotation + contrastive + inpainting (methods.md §5).

Tang et al., "Self-Supervised Pre-Training of Swin Transformers for 3D Medical Image Analysis",
CVPR 2022. The SwinViT encoder sees two cut-out, rotated crops of one volume; a linear head on
bottleneck token 0 predicts the rotation class (cross-entropy), a linear head on token 1 gives a
512-d embedding for NT-Xent between the two views, and a light convolutional decoder restores the
clean rotated views from the bottleneck (L1). The three losses are summed with weights 1:1:1.
There is no teacher. The reference every other method is compared against.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from monai.transforms import Compose, DeleteItemsd, EnsureTyped
from torch import Tensor, nn

from medssl3d.losses.ntxent import DEFAULT_TEMPERATURE, NTXentLoss
from medssl3d.methods import presets
from medssl3d.methods.base import SSLMethod, StepInfo
from medssl3d.networks.backbones import SwinBackbone
from medssl3d.networks.conv_decoder import DEFAULT_NUM_STAGES, ConvDecoder
from medssl3d.transforms.cutout import DEFAULT_MAX_FRACTION, RandCutoutd
from medssl3d.transforms.rotation import AXIAL_AXES, DEFAULT_NUM_CLASSES, RandRotate90Classd
from medssl3d.transforms.views import DEFAULT_ROI, VIEW_KEYS, two_views

__all__ = [
    "CUTOUT_POSTFIX",
    "ROTATION_POSTFIX",
    "SwinSSL",
    "SwinSSLConfig",
    "SwinSSLStudent",
    "build_swin_ssl",
    "config_from_yaml",
    "swin_ssl_transforms",
]

CUTOUT_POSTFIX = "_cutout"  # batch key of a view's cut-out copy: "view1_cutout"
ROTATION_POSTFIX = "_rot"  # batch key of a view's rotation class: "view1_rot"
CONTRAST_DIM = 512
NUM_VIEWS = 2  # NT-Xent pairs exactly two views


@dataclass(frozen=True)
class SwinSSLConfig:
    """Hyper-parameters of :class:`SwinSSL` (defaults: the published recipe at ``base`` size).

    Attributes:
        backbone_size: SwinBackbone size, "tiny" / "small" / "base" (feature_size 12 / 24 / 48).
        in_channels: input (and reconstructed) channels.
        rotation_classes: rotation classes (4: 0/90/180/270 degrees).
        contrast_dim: width of the linear contrastive projection.
        temperature: NT-Xent temperature.
        rotation_weight: weight of the rotation cross-entropy.
        contrast_weight: weight of the NT-Xent loss.
        recon_weight: weight of the L1 restoration loss.
        rotation_token: bottleneck token (raster index) fed to the rotation head.
        contrast_token: bottleneck token fed to the contrastive head.
        decoder_stages: ×2 upsampling stages of the decoder (5 undoes the Swin stride of 32).
        use_checkpoint: gradient checkpointing in the Swin blocks.
        gather_distributed: NT-Xent negatives from every rank under DDP.
        view_keys: batch keys of the two clean (rotated) views, the restoration targets.
        input_postfix: ``view_key + input_postfix`` is the cut-out view fed to the network.
        label_postfix: ``view_key + label_postfix`` is the rotation class of the view, (B,) long.
    """

    backbone_size: str = "base"
    in_channels: int = 1
    rotation_classes: int = DEFAULT_NUM_CLASSES
    contrast_dim: int = CONTRAST_DIM
    temperature: float = DEFAULT_TEMPERATURE
    rotation_weight: float = 1.0
    contrast_weight: float = 1.0
    recon_weight: float = 1.0
    rotation_token: int = 0
    contrast_token: int = 1
    decoder_stages: int = DEFAULT_NUM_STAGES
    use_checkpoint: bool = False
    gather_distributed: bool = False
    view_keys: tuple[str, ...] = VIEW_KEYS
    input_postfix: str = CUTOUT_POSTFIX
    label_postfix: str = ROTATION_POSTFIX

    def __post_init__(self) -> None:
        # YAML / JSON give lists: store a tuple so the config stays hashable.
        object.__setattr__(self, "view_keys", tuple(self.view_keys))
        if len(self.view_keys) != NUM_VIEWS or len(set(self.view_keys)) != NUM_VIEWS:
            raise ValueError(f"view_keys must be {NUM_VIEWS} different keys, got {self.view_keys}")
        if not self.input_postfix or not self.label_postfix:
            raise ValueError("input_postfix and label_postfix must be non-empty")
        for name in ("in_channels", "rotation_classes", "contrast_dim", "decoder_stages"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        for name in ("rotation_weight", "contrast_weight", "recon_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if min(self.rotation_token, self.contrast_token) < 0:
            raise ValueError(
                f"token indices must be >= 0, got rotation_token={self.rotation_token}, "
                f"contrast_token={self.contrast_token}"
            )


def config_from_yaml(path: str | os.PathLike, preset: str = "base", **overrides: Any) -> SwinSSLConfig:
    """Read a preset of ``configs/methods/swin_ssl.yaml`` (see :func:`medssl3d.methods.presets.config_from_yaml`)."""
    return presets.config_from_yaml(SwinSSLConfig, path, preset, **overrides)


class SwinSSLStudent(nn.Module):
    """SwinViT encoder with the rotation, contrastive and reconstruction heads.

    Args:
        config: the method's hyper-parameters.
    """

    def __init__(self, config: SwinSSLConfig) -> None:
        super().__init__()
        self.rotation_token = config.rotation_token
        self.contrast_token = config.contrast_token
        self.backbone = SwinBackbone(
            size=config.backbone_size, in_channels=config.in_channels, use_checkpoint=config.use_checkpoint
        )
        dim = self.backbone.embed_dim
        self.rotation_head = nn.Linear(dim, config.rotation_classes)
        self.contrast_head = nn.Linear(dim, config.contrast_dim)
        self.decoder = ConvDecoder(
            dim,
            out_channels=config.in_channels,
            min_channels=self.backbone.feature_size,
            num_stages=config.decoder_stages,
        )

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Run encoder and heads.

        Args:
            x: cut-out views (B, C, D, H, W), sides divisible by 32 and at least two bottleneck tokens.

        Returns:
            ``rotation`` logits (B, rotation_classes), ``embedding`` (B, contrast_dim) and
            ``reconstruction`` (B, C, D, H, W) (for the default 5 decoder stages).

        Raises:
            ValueError: the bottleneck has too few tokens for the configured token indices.
        """
        out = self.backbone(x)
        n_tokens = out.tokens.shape[1]
        if max(self.rotation_token, self.contrast_token) >= n_tokens:
            raise ValueError(
                f"input {tuple(x.shape[2:])} gives {n_tokens} bottleneck token(s); the heads read tokens "
                f"{self.rotation_token} and {self.contrast_token} (use a larger crop)"
            )
        return {
            "rotation": self.rotation_head(out.tokens[:, self.rotation_token]),
            "embedding": self.contrast_head(out.tokens[:, self.contrast_token]),
            "reconstruction": self.decoder(out.features[-1]),
        }


class SwinSSL(SSLMethod):
    """Swin UNETR self-supervised pretraining (rotation + NT-Xent + L1 inpainting).

    The batch (from :func:`swin_ssl_transforms`) holds, for each of the two view keys ``v``:
    the clean rotated view ``v`` (B, C, D, H, W), its cut-out copy ``v + "_cutout"`` (the input)
    and its rotation class ``v + "_rot"`` (B,). Both views run through the student as one batch
    of 2B (no layer mixes samples, so this equals two separate calls).

    Args:
        config: hyper-parameters; the defaults are the published recipe.
    """

    name = "swin_ssl"

    def __init__(self, config: SwinSSLConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else SwinSSLConfig()
        self.backbone_name = f"swin-{self.config.backbone_size}"
        self.student = SwinSSLStudent(self.config)
        self.rotation_loss = nn.CrossEntropyLoss()
        self.contrast_loss = NTXentLoss(
            self.config.temperature, gather_distributed=self.config.gather_distributed
        )
        self.recon_loss = nn.L1Loss()

    def forward(self, batch: dict[str, Any], step: StepInfo) -> dict[str, Any]:
        """Compute the weighted sum of the three losses.

        Args:
            batch: ``{v: (B, C, D, H, W), v + input_postfix: (B, C, D, H, W), v + label_postfix: (B,)}``
                for both view keys ``v``.
            step: unused (no schedule in this method).

        Returns:
            ``{"loss": scalar, "parts": {"rot", "contrast", "recon"}}`` (parts detached, unweighted).

        Raises:
            KeyError: a batch key is missing (the message lists the batch's keys).
        """
        cfg = self.config
        try:
            inputs = torch.cat([batch[f"{v}{cfg.input_postfix}"] for v in cfg.view_keys])
            targets = torch.cat([batch[v] for v in cfg.view_keys])
            labels = torch.cat(
                [torch.as_tensor(batch[f"{v}{cfg.label_postfix}"]).reshape(-1) for v in cfg.view_keys]
            )
        except KeyError as e:
            raise KeyError(f"swin_ssl batch lacks {e}; it has {sorted(batch)}") from e
        out = self.run_student(inputs)
        rot = self.rotation_loss(out["rotation"], labels.to(device=inputs.device, dtype=torch.long))
        z1, z2 = out["embedding"].chunk(NUM_VIEWS)
        contrast = self.contrast_loss(z1, z2)
        recon = self.recon_loss(out["reconstruction"], targets)
        loss = cfg.rotation_weight * rot + cfg.contrast_weight * contrast + cfg.recon_weight * recon
        return {
            "loss": loss,
            "parts": {"rot": rot.detach(), "contrast": contrast.detach(), "recon": recon.detach()},
        }


def build_swin_ssl(**cfg: Any) -> SwinSSL:
    """Build :class:`SwinSSL` from :class:`SwinSSLConfig` fields (a bundle's ``_target_``).

    Raises:
        ValueError: an unknown field or a bad value.
    """
    return SwinSSL(presets.config_from_kwargs(SwinSSLConfig, **cfg))


def swin_ssl_transforms(
    roi: Sequence[int] = DEFAULT_ROI,
    *,
    source_key: str = "image",
    view_keys: Sequence[str] = VIEW_KEYS,
    rotation_classes: int = DEFAULT_NUM_CLASSES,
    rotation_axes: Sequence[int] = AXIAL_AXES,
    max_cutout_fraction: float = DEFAULT_MAX_FRACTION,
    cutout_fill: str = "noise",
    input_postfix: str = CUTOUT_POSTFIX,
    label_postfix: str = ROTATION_POSTFIX,
    **view_kwargs: Any,
) -> Compose:
    """View generation of :class:`SwinSSL`, from a loaded, preprocessed volume to a training sample.

    Two random crops (:func:`~medssl3d.transforms.views.two_views`), each rotated by its own
    random class and cut out by its own random boxes; the source volume is dropped so that
    samples of different volumes collate, and MetaTensors become plain tensors.

    Args:
        roi: crop size (D, H, W); the two sides of the rotation plane must be equal.
        source_key: key of the volume (1, D, H, W), intensities in [0, 1] (a data preset's output).
        view_keys: the two view keys.
        rotation_classes: rotation classes (4: 0/90/180/270 degrees).
        rotation_axes: spatial axes of the rotation plane.
        max_cutout_fraction: cap on the cut-out fraction of voxels per view.
        cutout_fill: "noise" or "zero".
        input_postfix: suffix of the cut-out views' keys.
        label_postfix: suffix of the rotation labels' keys.
        **view_kwargs: more :func:`two_views` arguments (flips, intensity jitter).

    Returns:
        A ``Compose`` giving ``{v: (1, *roi) clean rotated view, v + input_postfix: (1, *roi),
        v + label_postfix: () long, v + "_cutout_fraction": () float}`` for each view key ``v``.

    Raises:
        ValueError: the rotation plane of ``roi`` is not square (views of one batch could not stack).
    """
    roi = tuple(int(s) for s in roi)
    a, b = rotation_axes
    if len(roi) <= max(a, b) or roi[a] != roi[b]:
        raise ValueError(f"roi {roi} must have equal sides along the rotation axes {tuple(rotation_axes)}")
    per_view = []
    for v in view_keys:
        per_view.append(
            RandRotate90Classd(
                keys=v,
                label_key=f"{v}{label_postfix}",
                num_classes=rotation_classes,
                spatial_axes=rotation_axes,
            )
        )
        per_view.append(
            RandCutoutd(
                keys=v, output_postfix=input_postfix, max_fraction=max_cutout_fraction, fill=cutout_fill
            )
        )
    return Compose(
        [
            two_views(roi, source_key=source_key, view_keys=view_keys, **view_kwargs),
            *per_view,
            DeleteItemsd(keys=source_key),
            EnsureTyped(keys=list(view_keys) + [f"{v}{input_postfix}" for v in view_keys], track_meta=False),
        ]
    )
