"""Swin UNETR self-supervised pretraining: rotation, contrast and inpainting (docs/methods.md, "Swin UNETR SSL").

Tang et al., "Self-Supervised Pre-Training of Swin Transformers for 3D Medical Image Analysis",
CVPR 2022. Each sample is one random crop of a volume; its two views are that crop, each rotated by its
own random quarter-turn class and cut out by its own random boxes (noise, then boxes pasted from another
sample of the batch). The SwinViT encoder sees the cut-out views; a linear head on bottleneck token 0
predicts the rotation class (cross-entropy), a linear head on token 1 gives a 512-d embedding for NT-Xent
(the positive of a view is the other view of its crop, every other view of the batch is a negative), and
a light convolutional decoder restores the rotated, un-cut views from the bottleneck (L1). The three
losses are summed with weights 1:1:1. There is no teacher. The reference every other method is compared
against.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from monai.transforms import Compose, DeleteItemsd, EnsureTyped
from monai.utils import MAX_SEED
from torch import Tensor, nn

from medssl3d.losses.ntxent import DEFAULT_TEMPERATURE, NTXentLoss
from medssl3d.methods import presets
from medssl3d.methods.base import SSLMethod, StepInfo
from medssl3d.networks.backbones import SwinBackbone
from medssl3d.networks.conv_decoder import DEFAULT_NUM_STAGES, ConvDecoder
from medssl3d.transforms.cutout import DEFAULT_MAX_BLOCK, DEFAULT_MAX_FRACTION, RandBatchPaste, RandCutoutd
from medssl3d.transforms.rotation import DEFAULT_NUM_CLASSES, SAGITTAL_AXES, RandRotate90Classd
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
SPATIAL_DIMS = 3


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
        fused_attention: swap in the fused Swin window attention (same weights and results as MONAI's).
        gather_distributed: NT-Xent negatives from every rank under DDP.
        paste_cutout: the original's second cut-out pass: each view gets boxes of the rotated, un-cut
            view of a random other sample of the batch (same view key) pasted in; see
            :class:`~medssl3d.transforms.cutout.RandBatchPaste`.
        paste_max_fraction: cap on the fraction of a view's voxels the paste pass overwrites.
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
    fused_attention: bool = True
    gather_distributed: bool = False
    paste_cutout: bool = True
    paste_max_fraction: float = DEFAULT_MAX_FRACTION
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
        if not DEFAULT_MAX_BLOCK**SPATIAL_DIMS <= self.paste_max_fraction <= 1.0:
            raise ValueError(
                f"paste_max_fraction must be in [{DEFAULT_MAX_BLOCK**SPATIAL_DIMS}, 1] (one box of side "
                f"{DEFAULT_MAX_BLOCK} must fit), got {self.paste_max_fraction}"
            )
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
            size=config.backbone_size, in_channels=config.in_channels, use_checkpoint=config.use_checkpoint,
            fused_attention=config.fused_attention,
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
            x: cut-out views (B, C, R, A, S), sides divisible by 32 and at least two bottleneck tokens.

        Returns:
            ``rotation`` logits (B, rotation_classes), ``embedding`` (B, contrast_dim) and
            ``reconstruction`` (B, C, R, A, S) (for the default 5 decoder stages).

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
    the rotated, un-cut view ``v`` (B, C, R, A, S), its cut-out copy ``v + "_cutout"`` and its rotation
    class ``v + "_rot"`` (B,); row b of both views is the same crop. With ``paste_cutout`` the method
    then runs the second cut-out pass on each view's batch (it needs the other samples); its draws come
    from one seed taken from torch's default generator per call, which the engine checkpoints and
    restores, so a resumed run repeats them. Both views run through the student as one batch of 2B
    (no layer mixes samples, so this equals two separate calls).

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
        self.paste = RandBatchPaste(max_fraction=self.config.paste_max_fraction)

    def forward(self, batch: dict[str, Any], step: StepInfo) -> dict[str, Any]:
        """Compute the weighted sum of the three losses.

        Args:
            batch: ``{v: (B, C, R, A, S), v + input_postfix: (B, C, R, A, S), v + label_postfix: (B,)}``
                for both view keys ``v``.
            step: unused (no schedule in this method).

        Returns:
            ``{"loss": scalar, "parts": {"rot", "contrast", "recon"}}`` (parts detached, unweighted).

        Raises:
            KeyError: a batch key is missing (the message lists the batch's keys).
        """
        cfg = self.config
        try:
            cut = [batch[f"{v}{cfg.input_postfix}"] for v in cfg.view_keys]
            clean = [batch[v] for v in cfg.view_keys]
            labels = torch.cat(
                [torch.as_tensor(batch[f"{v}{cfg.label_postfix}"]).reshape(-1) for v in cfg.view_keys]
            )
        except KeyError as e:
            raise KeyError(f"swin_ssl batch lacks {e}; it has {sorted(batch)}") from e
        if cfg.paste_cutout:
            self.paste.set_random_state(seed=int(torch.randint(MAX_SEED, ())))
            cut = [self.paste(x, source) for x, source in zip(cut, clean, strict=True)]
        inputs, targets = torch.cat(cut), torch.cat(clean)
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


def build_swin_ssl(*, preset: str = presets.BASE_PRESET, **cfg: Any) -> SwinSSL:
    """Build :class:`SwinSSL` from a preset and :class:`SwinSSLConfig` fields (a bundle's ``_target_``).

    Args:
        preset: a preset of ``configs/methods/swin_ssl.yaml``, e.g. ``"no_paste_cutout"`` (``"base"``: the
            defaults).
        **cfg: SwinSSLConfig fields; they win over the preset.

    Raises:
        ValueError: an unknown preset or field, or a bad value.
    """
    config = presets.resolve_method_config(SwinSSL.name, preset, **cfg)
    presets.log_method_config(SwinSSL.name, preset, config)
    return SwinSSL(config)


def swin_ssl_transforms(
    roi: Sequence[int] = DEFAULT_ROI,
    *,
    source_key: str = "image",
    view_keys: Sequence[str] = VIEW_KEYS,
    independent_crops: bool = False,
    flip_prob: float = 0.0,
    intensity_prob: float = 0.0,
    rotation_classes: int = DEFAULT_NUM_CLASSES,
    rotation_axes: Sequence[int] = SAGITTAL_AXES,
    max_cutout_fraction: float = DEFAULT_MAX_FRACTION,
    cutout_fill: str = "noise",
    input_postfix: str = CUTOUT_POSTFIX,
    label_postfix: str = ROTATION_POSTFIX,
    **view_kwargs: Any,
) -> Compose:
    """View generation of :class:`SwinSSL`, from a loaded, preprocessed volume to a training sample.

    One random crop copied to both view keys (:func:`~medssl3d.transforms.views.two_views`); each view
    is rotated by its own random class and cut out (noise boxes) by its own random boxes. The source
    volume is dropped so that samples of different volumes collate, and MetaTensors become plain tensors.
    The second cut-out pass, which needs the batch, runs in :class:`SwinSSL`.

    Args:
        roi: crop size along (R, A, S); the two sides of the rotation plane must be equal.
        source_key: key of the volume (1, R, A, S), intensities in [0, 1] (a data preset's output).
        view_keys: the two view keys.
        independent_crops: give each view its own random crop (not the reference: the views of a pair
            may then share no voxel).
        flip_prob: probability of a left-right flip of each view (the reference has none).
        intensity_prob: probability of each of the intensity scale and shift jitter of each view (the
            reference has none).
        rotation_classes: rotation classes (4: 0/90/180/270 degrees).
        rotation_axes: spatial axes of the rotation plane; default (A, S), the sagittal plane, as the
            reference.
        max_cutout_fraction: cap on the cut-out fraction of voxels per view.
        cutout_fill: "noise" or "zero".
        input_postfix: suffix of the cut-out views' keys.
        label_postfix: suffix of the rotation labels' keys.
        **view_kwargs: more :func:`two_views` arguments (``flip_axes``, ``scale_factor``, ``shift_offset``).

    Returns:
        A ``Compose`` giving ``{v: (1, *roi) rotated, un-cut view, v + input_postfix: (1, *roi),
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
            two_views(
                roi,
                source_key=source_key,
                view_keys=view_keys,
                independent_crops=independent_crops,
                flip_prob=flip_prob,
                intensity_prob=intensity_prob,
                **view_kwargs,
            ),
            *per_view,
            DeleteItemsd(keys=source_key),
            EnsureTyped(keys=list(view_keys) + [f"{v}{input_postfix}" for v in view_keys], track_meta=False),
        ]
    )
