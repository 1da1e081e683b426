"""Segmentation networks for the segmentation bundle, chosen by one ``arch`` name.

The bundle's ``network_def`` calls :func:`build_segmentation_network`, so switching a Swin encoder for a
ViT encoder is one override (``--arch unetr``) instead of a second block of network arguments.
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.nets import UNETR, SwinUNETR
from torch import nn

from medssl3d.networks.backbones import BACKBONE_SIZES
from medssl3d.networks.window_attention import fuse_window_attention

ARCHS = ("swinunetr", "unetr")
#: The encoder family each network takes (keys of :data:`~medssl3d.networks.backbones.BACKBONE_SIZES`).
ENCODER_FAMILY = {"swinunetr": "swin", "unetr": "vit"}
#: UNETR's decoder width (MONAI's default); its encoder's width comes from the backbone size.
UNETR_DECODER_FEATURE_SIZE = 16
DEFAULT_FEATURE_SIZE = 48
DEFAULT_VIT_HIDDEN_SIZE = 768
DEFAULT_VIT_MLP_DIM = 3072
DEFAULT_VIT_NUM_HEADS = 12


def network_widths(arch: str, backbone_size: str) -> dict[str, int]:
    """The network's width arguments for an encoder of a named size, the size pretraining names it by.

    Args:
        arch: ``"swinunetr"`` or ``"unetr"``.
        backbone_size: ``"tiny"``, ``"small"`` or ``"base"``.

    Returns:
        ``feature_size``, ``vit_hidden_size``, ``vit_mlp_dim``, ``vit_num_heads`` of
        :func:`build_segmentation_network` (for SwinUNETR the ViT ones are the defaults, unused).

    Raises:
        ValueError: an unknown ``arch`` or a size its encoder family lacks.
    """
    if arch not in ENCODER_FAMILY:
        raise ValueError(f"arch={arch!r} is not one of {ARCHS}")
    sizes = BACKBONE_SIZES[ENCODER_FAMILY[arch]]
    if backbone_size not in sizes:
        raise ValueError(f"backbone_size for {arch} must be one of {sorted(sizes)}, got {backbone_size!r}")
    size = sizes[backbone_size]
    if arch == "swinunetr":
        return {"feature_size": size.feature_size, "vit_hidden_size": DEFAULT_VIT_HIDDEN_SIZE,
                "vit_mlp_dim": DEFAULT_VIT_MLP_DIM, "vit_num_heads": DEFAULT_VIT_NUM_HEADS}
    return {"feature_size": UNETR_DECODER_FEATURE_SIZE, "vit_hidden_size": size.hidden_size,
            "vit_mlp_dim": size.mlp_dim, "vit_num_heads": size.num_heads}


def build_segmentation_network(
    arch: str,
    *,
    in_channels: int,
    out_channels: int,
    feature_size: int = DEFAULT_FEATURE_SIZE,
    img_size: Sequence[int] | None = None,
    vit_hidden_size: int = DEFAULT_VIT_HIDDEN_SIZE,
    vit_mlp_dim: int = DEFAULT_VIT_MLP_DIM,
    vit_num_heads: int = DEFAULT_VIT_NUM_HEADS,
    use_checkpoint: bool = False,
    fused_attention: bool = True,
) -> nn.Module:
    """Build a MONAI 3D segmentation network: ``(B, in_channels, D, H, W)`` -> ``(B, out_channels, D, H, W)``.

    Args:
        arch: ``"swinunetr"`` (MONAI ``SwinUNETR``; D, H, W divisible by 32) or ``"unetr"`` (MONAI ``UNETR``
            for ViT encoders; input must be exactly ``img_size``, patch size 16).
        in_channels: input channels (1 for CT / single-sequence MRI).
        out_channels: classes including background.
        feature_size: SwinUNETR embedding size (12 / 24 / 48 for tiny / small / base) or UNETR decoder width.
        img_size: UNETR input size ``(D, H, W)``; required for ``"unetr"``, unused for ``"swinunetr"``.
        vit_hidden_size: UNETR ViT width; must match the pretrained ViT encoder.
        vit_mlp_dim: UNETR ViT MLP width.
        vit_num_heads: UNETR ViT attention heads.
        use_checkpoint: SwinUNETR gradient checkpointing (saves memory on large ROIs).
        fused_attention: SwinUNETR's window attention as the fused modules pretraining uses
            (:func:`~medssl3d.networks.window_attention.fuse_window_attention`): the same state-dict keys and
            outputs as MONAI's, about twice as fast on CPU; false keeps MONAI's modules.

    Returns:
        The network (on CPU).

    Raises:
        ValueError: unknown ``arch``, or ``"unetr"`` without ``img_size``.
    """
    if arch == "swinunetr":
        net = SwinUNETR(
            in_channels=in_channels,
            out_channels=out_channels,
            feature_size=feature_size,
            use_checkpoint=use_checkpoint,
            spatial_dims=3,
        )
        if fused_attention:
            fuse_window_attention(net)
        return net
    if arch == "unetr":
        if img_size is None:
            raise ValueError("arch='unetr' needs img_size (the ROI size the ViT encoder was built for)")
        return UNETR(
            in_channels=in_channels,
            out_channels=out_channels,
            img_size=tuple(img_size),
            feature_size=feature_size,
            hidden_size=vit_hidden_size,
            mlp_dim=vit_mlp_dim,
            num_heads=vit_num_heads,
            spatial_dims=3,
        )
    raise ValueError(f"arch={arch!r} is not one of {ARCHS}")
