"""3D backbones behind one token interface: MONAI's SwinUNETR encoder and MONAI's ViT.

Every backbone maps a volume ``(B, 1, D, H, W)`` to a :class:`BackboneOutput`: bottleneck
tokens ``(B, N, C)`` in raster order of the (R, A, S) token grid (the last axis, inferior→superior,
varies fastest), multi-scale feature maps (finest first)
and their strides. Each wraps the MONAI network it exports to as ``self.net``, so that its
state-dict keys are that network's keys under ``net.``; export is a prefix rewrite
(:func:`to_target_keys`), and the exported dict loads into MONAI ``SwinUNETR`` / ``UNETR``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

from monai.networks.nets import SwinUNETR, ViT
from monai.utils import ensure_tuple_rep
from torch import Tensor, nn

from medssl3d.networks.window_attention import fuse_window_attention

logger = logging.getLogger(__name__)

__all__ = [
    "BACKBONES",
    "BACKBONE_SIZES",
    "EXPORT_TARGETS",
    "NET_PREFIX",
    "Backbone",
    "BackboneOutput",
    "ExportTarget",
    "SwinBackbone",
    "SwinSize",
    "ViTBackbone",
    "ViTSize",
    "build_backbone",
    "to_target_keys",
]

NET_PREFIX = "net."
"""Prefix of every backbone state-dict key: the wrapped MONAI network is ``self.net``."""


# --------------------------------------------------------------------------------------
# Sizes: the one place for the architecture numbers.
# --------------------------------------------------------------------------------------
# SwinUNETR decoder stages, from the stride-16 one (decoder5) to full resolution (decoder1)
DECODER_STAGES = 5


@dataclass(frozen=True)
class SwinSize:
    """SwinUNETR encoder hyper-parameters (MONAI defaults apart from ``feature_size``)."""

    feature_size: int
    depths: tuple[int, ...] = (2, 2, 2, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    patch_size: int = 2


@dataclass(frozen=True)
class ViTSize:
    """ViT hyper-parameters (``num_layers`` is 12 because MONAI ``UNETR`` fixes it)."""

    hidden_size: int
    num_heads: int
    mlp_dim: int
    num_layers: int = 12


BACKBONE_SIZES: dict[str, dict[str, SwinSize | ViTSize]] = {
    "swin": {
        "tiny": SwinSize(feature_size=12),
        "small": SwinSize(feature_size=24),
        "base": SwinSize(feature_size=48),
    },
    "vit": {
        "tiny": ViTSize(hidden_size=192, num_heads=3, mlp_dim=768),
        "small": ViTSize(hidden_size=384, num_heads=6, mlp_dim=1536),
        "base": ViTSize(hidden_size=768, num_heads=12, mlp_dim=3072),
    },
}

SWIN_STAGES = 5
"""swinViT returns the patch embedding plus the four stage outputs."""
SWIN_BOTTLENECK_WIDTH = 2 ** (SWIN_STAGES - 1)
"""Bottleneck channels are ``feature_size * 16``."""
SWIN_DECODER_MODULES = (
    "encoder1",
    "encoder2",
    "encoder3",
    "encoder4",
    "encoder10",
    "decoder5",
    "decoder4",
    "decoder3",
    "decoder2",
    "decoder1",
)
"""SwinUNETR's convolutional path around swinViT; kept only with ``with_decoder=True``."""
SWIN_OUT_MODULE = "out"
"""SwinUNETR's task-specific 1x1x1 conv: never part of a backbone nor of an export."""
VIT_PATCH_SIZE = 16
"""MONAI ``UNETR`` fixes the ViT patch size at 16, so export to it needs the same."""


# --------------------------------------------------------------------------------------
# Export targets.
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExportTarget:
    """How backbone keys (``net.<key>``) become keys of a MONAI network.

    Attributes:
        prefix: prepended to ``<key>`` (``""`` for SwinUNETR, ``"vit."`` for UNETR).
        encoder_prefix: target keys that belong to the pretrained encoder.
        backbone: the backbone name (``BACKBONES`` key) that exports to this target.
    """

    prefix: str
    encoder_prefix: str
    backbone: str


EXPORT_TARGETS: dict[str, ExportTarget] = {
    "swinunetr": ExportTarget(prefix="", encoder_prefix="swinViT.", backbone="swin"),
    "unetr": ExportTarget(prefix="vit.", encoder_prefix="vit.", backbone="vit"),
}


def _export_target(target: str) -> ExportTarget:
    if target not in EXPORT_TARGETS:
        raise ValueError(f"unknown export target {target!r}; expected one of {sorted(EXPORT_TARGETS)}")
    return EXPORT_TARGETS[target]


def to_target_keys(state: Mapping[str, Tensor], target: str) -> dict[str, Tensor]:
    """Rewrite a backbone state dict (keys ``net.*``) into keys of a MONAI network.

    Args:
        state: a backbone's ``state_dict()``; keys without the ``net.`` prefix are dropped.
        target: ``"swinunetr"`` or ``"unetr"``.

    Returns:
        Detached CPU copies under the target's keys; SwinUNETR's ``out.`` conv is never included.

    Raises:
        ValueError: for an unknown target.
    """
    spec = _export_target(target)
    out = {}
    for key, value in state.items():
        if not key.startswith(NET_PREFIX):
            continue
        name = key[len(NET_PREFIX) :]
        if name.startswith(SWIN_OUT_MODULE + "."):
            continue
        out[spec.prefix + name] = value.detach().cpu().clone()
    return out


# --------------------------------------------------------------------------------------
# Interface.
# --------------------------------------------------------------------------------------
@dataclass
class BackboneOutput:
    """What every backbone returns.

    Attributes:
        tokens: ``(B, N, C)`` bottleneck tokens in raster order of the (R, A, S) grid, i.e.
            ``features[-1].flatten(2).transpose(1, 2)``.
        features: multi-scale maps ``(B, C_i, D_i, H_i, W_i)``, finest first.
        strides: the stride of each entry of ``features`` relative to the input.
        hidden_states: the transformer's intermediate outputs for UNETR-style decoders:
            ViT: the output ``(B, N, C)`` of every block (before the final norm);
            Swin: the swinViT hidden states (the same list as ``features``).
    """

    tokens: Tensor
    features: list[Tensor]
    strides: tuple[int, ...]
    hidden_states: list[Tensor] = field(default_factory=list)


class Backbone(nn.Module):
    """Base class: ``forward(x (B, 1, D, H, W)) -> BackboneOutput``.

    Subclasses set ``embed_dim`` (bottleneck channels), ``patch_stride`` (bottleneck stride),
    ``export_target`` (the MONAI network the weights load into) and ``self.net``.
    """

    embed_dim: int
    patch_stride: int
    export_target: str

    def forward(self, x: Tensor) -> BackboneOutput:  # pragma: no cover - abstract
        """Encode ``x`` of shape ``(B, C_in, D, H, W)``."""
        raise NotImplementedError

    def export_state_dict(self, target: str | None = None) -> dict[str, Tensor]:
        """State dict whose keys load into the MONAI network of ``target``.

        Args:
            target: ``"swinunetr"`` for :class:`SwinBackbone`, ``"unetr"`` for
                :class:`ViTBackbone`; ``None`` picks the backbone's own.

        Raises:
            ValueError: when ``target`` is not the backbone's export target.
        """
        target = self.export_target if target is None else target
        if target != self.export_target:
            raise ValueError(f"{type(self).__name__} exports to {self.export_target!r}, not to {target!r}")
        return to_target_keys(self.state_dict(), target)

    def _check_input(self, x: Tensor, in_channels: int, spatial_dims: int) -> None:
        if x.ndim != spatial_dims + 2 or x.shape[1] != in_channels:
            raise ValueError(
                f"{type(self).__name__} expects input (B, {in_channels}, *{spatial_dims} spatial dims), "
                f"got shape {tuple(x.shape)}"
            )


# --------------------------------------------------------------------------------------
# Swin.
# --------------------------------------------------------------------------------------
class SwinBackbone(Backbone):
    """The SwinUNETR encoder (MONAI ``SwinUNETR.swinViT``), optionally with its decoder.

    Wraps a MONAI ``SwinUNETR`` as ``self.net`` so that state-dict keys are exactly
    SwinUNETR's (``net.swinViT.*``, ``net.encoder*``, ``net.decoder*``); its ``out`` conv is
    removed, and with ``with_decoder=False`` so is the convolutional path, so that optimizers
    carry no unused parameters.

    Args:
        size: ``"tiny"``, ``"small"`` or ``"base"`` (``feature_size`` 12 / 24 / 48).
        in_channels: input channels.
        with_decoder: keep SwinUNETR's encoder1..encoder10 and decoder5..decoder1 for :meth:`decode`.
        use_checkpoint: gradient checkpointing in the Swin blocks (less memory, same result).
        spatial_dims: 3 for volumes (2 works the same way on images).
        normalize: layer-normalise every hidden state, as ``SwinUNETR.forward`` does.
        use_flash_attention: MONAI's fused window attention, used when gradients are disabled
            (only with ``fused_attention=False``, which covers inference too).
        fused_attention: swap in :class:`~medssl3d.networks.window_attention.FusedWindowAttention`
            (fused kernel in training and inference, shift masks cached; same keys and results).

    Raises:
        ValueError: for an unknown size.
    """

    export_target = "swinunetr"

    def __init__(
        self,
        size: str = "tiny",
        in_channels: int = 1,
        with_decoder: bool = False,
        use_checkpoint: bool = False,
        spatial_dims: int = 3,
        normalize: bool = True,
        use_flash_attention: bool = False,
        fused_attention: bool = True,
    ) -> None:
        super().__init__()
        cfg = cast(SwinSize, _size("swin", size))
        self.size = size
        self.in_channels = in_channels
        self.spatial_dims = spatial_dims
        self.with_decoder = with_decoder
        self.normalize = normalize
        self.feature_size = cfg.feature_size
        self.embed_dim = cfg.feature_size * SWIN_BOTTLENECK_WIDTH
        self.patch_stride = cfg.patch_size**SWIN_STAGES
        self.strides = tuple(cfg.patch_size ** (i + 1) for i in range(SWIN_STAGES))
        self.feature_channels = tuple(cfg.feature_size * 2**i for i in range(SWIN_STAGES))
        self.decoder_channels = cfg.feature_size
        self.net = SwinUNETR(
            in_channels=in_channels,
            out_channels=1,  # the out conv is deleted below; any width will do
            patch_size=cfg.patch_size,
            depths=cfg.depths,
            num_heads=cfg.num_heads,
            window_size=cfg.window_size,
            feature_size=cfg.feature_size,
            normalize=normalize,
            use_checkpoint=use_checkpoint,
            spatial_dims=spatial_dims,
            use_flash_attention=use_flash_attention,
        )
        delattr(self.net, SWIN_OUT_MODULE)
        if not with_decoder:
            for name in SWIN_DECODER_MODULES:
                delattr(self.net, name)
        if fused_attention:
            fuse_window_attention(self.net)

    def check_input_size(self, spatial_shape: Sequence[int]) -> None:
        """Raise ``ValueError`` naming the shape unless every side is divisible by the bottleneck stride."""
        bad = [s for s in spatial_shape if s % self.patch_stride]
        if bad:
            raise ValueError(
                f"SwinBackbone input spatial shape {tuple(spatial_shape)} must be divisible by "
                f"{self.patch_stride} along every axis"
            )

    def forward(self, x: Tensor) -> BackboneOutput:
        """Run the Swin encoder only.

        Args:
            x: ``(B, C_in, D, H, W)`` with D, H, W divisible by 32.

        Returns:
            features: the 5 swinViT hidden states ``(B, f*2^i, D/2^(i+1), ...)``, strides
            2, 4, 8, 16, 32; tokens: the last one flattened to ``(B, N, 16 f)``.

        Raises:
            ValueError: for a wrong rank / channel count or a side not divisible by 32.
        """
        self._check_input(x, self.in_channels, self.spatial_dims)
        self.check_input_size(x.shape[2:])
        hidden = self.net.swinViT(x, self.normalize)
        tokens = hidden[-1].flatten(2).transpose(1, 2)
        features = list(hidden)
        return BackboneOutput(tokens=tokens, features=features, strides=self.strides, hidden_states=features)

    def decode(self, x: Tensor, out: BackboneOutput) -> Tensor:
        """SwinUNETR's convolutional encoder/decoder path on precomputed hidden states.

        Args:
            x: the input given to :meth:`forward`, ``(B, C_in, D, H, W)``.
            out: what :meth:`forward` returned for ``x`` (the transformer is not rerun).

        Returns:
            ``(B, feature_size, D, H, W)``: SwinUNETR's last decoder output, before its out conv.

        Raises:
            RuntimeError: when the backbone was built with ``with_decoder=False``.
        """
        return self.decode_stages(x, out)[-1]

    def decode_stages(self, x: Tensor, out: BackboneOutput, num_stages: int = DECODER_STAGES) -> list[Tensor]:
        """The first ``num_stages`` outputs of SwinUNETR's decoder, coarsest first; later stages are not computed.

        Args:
            x: the input given to :meth:`forward`, ``(B, C_in, D, H, W)``.
            out: what :meth:`forward` returned for ``x``.
            num_stages: how many decoder stages to run (1 to 5).

        Returns:
            Stage ``i`` (0-based) is ``(B, C_i, D / 2^(4-i), H / 2^(4-i), W / 2^(4-i))`` with ``C`` =
            8, 4, 2, 1, 1 × ``feature_size``; the last of five is what :meth:`decode` returns.

        Raises:
            RuntimeError: when the backbone was built with ``with_decoder=False``.
            ValueError: ``num_stages`` outside 1..5.
        """
        if not self.with_decoder:
            raise RuntimeError("SwinBackbone.decode needs with_decoder=True")
        if not 1 <= num_stages <= DECODER_STAGES:
            raise ValueError(f"num_stages must be in 1..{DECODER_STAGES}, got {num_stages}")
        h, net = out.features, self.net
        # the skip of each stage, computed only when that stage runs
        skips = (
            lambda: h[3],
            lambda: net.encoder4(h[2]),
            lambda: net.encoder3(h[1]),
            lambda: net.encoder2(h[0]),
            lambda: net.encoder1(x),
        )
        decoders = (net.decoder5, net.decoder4, net.decoder3, net.decoder2, net.decoder1)
        y, stages = net.encoder10(h[4]), []
        for decoder, skip in zip(decoders[:num_stages], skips[:num_stages], strict=True):
            y = decoder(y, skip())
            stages.append(y)
        return stages


# --------------------------------------------------------------------------------------
# ViT.
# --------------------------------------------------------------------------------------
class ViTBackbone(Backbone):
    """MONAI ``ViT`` (the UNETR encoder) with a frozen sin-cos position embedding.

    Args:
        size: ``"tiny"`` (192 / 3 heads), ``"small"`` (384 / 6), ``"base"`` (768 / 12, ViT-B/16).
        img_size: the input's spatial shape ``(D, H, W)`` (the position grid is fixed by it).
        in_channels: input channels.
        patch_size: patch side; 16 to export into MONAI ``UNETR``.
        dropout_rate: dropout inside the transformer blocks.
        spatial_dims: 3 for volumes.

    Raises:
        ValueError: for an unknown size or an ``img_size`` not divisible by ``patch_size``.
    """

    export_target = "unetr"

    def __init__(
        self,
        size: str = "tiny",
        img_size: Sequence[int] | int = (96, 96, 96),
        in_channels: int = 1,
        patch_size: int = VIT_PATCH_SIZE,
        dropout_rate: float = 0.0,
        spatial_dims: int = 3,
    ) -> None:
        super().__init__()
        cfg = cast(ViTSize, _size("vit", size))
        img_size = tuple(ensure_tuple_rep(img_size, spatial_dims))
        if any(s % patch_size for s in img_size):
            raise ValueError(f"ViTBackbone img_size {img_size} must be divisible by patch_size {patch_size}")
        self.size = size
        self.in_channels = in_channels
        self.spatial_dims = spatial_dims
        self.img_size = img_size
        self.grid_size = tuple(s // patch_size for s in img_size)
        self.embed_dim = cfg.hidden_size
        self.patch_stride = patch_size
        self.net = ViT(
            in_channels=in_channels,
            img_size=img_size,
            patch_size=patch_size,
            hidden_size=cfg.hidden_size,
            mlp_dim=cfg.mlp_dim,
            num_layers=cfg.num_layers,
            num_heads=cfg.num_heads,
            proj_type="conv",
            pos_embed_type="sincos",
            classification=False,
            dropout_rate=dropout_rate,
            spatial_dims=spatial_dims,
        )
        # MONAI already builds sincos embeddings without grad; the backbone relies on it.
        self.net.patch_embedding.position_embeddings.requires_grad_(False)

    def export_state_dict(self, target: str | None = None) -> dict[str, Tensor]:
        """State dict whose keys (``vit.*``) load into MONAI ``UNETR``.

        Raises:
            ValueError: for a target other than ``"unetr"`` or a patch size UNETR cannot take.
        """
        if self.patch_stride != VIT_PATCH_SIZE:
            raise ValueError(f"UNETR needs patch_size {VIT_PATCH_SIZE}; this ViT has {self.patch_stride}")
        return super().export_state_dict(target)

    def forward(self, x: Tensor) -> BackboneOutput:
        """Encode ``x``.

        Args:
            x: ``(B, C_in, *img_size)``.

        Returns:
            tokens ``(B, N, hidden)`` after the final LayerNorm, N = prod(img_size / patch);
            features ``[(B, hidden, D/p, H/p, W/p)]``; strides ``(p,)``; hidden_states: every
            block's output ``(B, N, hidden)``.

        Raises:
            ValueError: for a wrong rank / channel count or a spatial shape other than ``img_size``.
        """
        self._check_input(x, self.in_channels, self.spatial_dims)
        if tuple(x.shape[2:]) != self.img_size:
            raise ValueError(
                f"ViTBackbone was built for img_size {self.img_size}, got spatial shape {tuple(x.shape[2:])}"
            )
        tokens, hidden = self.net(x)
        # MONAI's conv patch embedding flattens the (R, A, S) patch grid in raster order (S fastest).
        fmap = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *self.grid_size)
        return BackboneOutput(
            tokens=tokens, features=[fmap], strides=(self.patch_stride,), hidden_states=list(hidden)
        )


# --------------------------------------------------------------------------------------
# Registry.
# --------------------------------------------------------------------------------------
def _size(family: str, size: str) -> SwinSize | ViTSize:
    sizes = BACKBONE_SIZES[family]
    if size not in sizes:
        raise ValueError(f"unknown {family} size {size!r}; expected one of {sorted(sizes)}")
    return sizes[size]


BACKBONES: dict[str, Callable[..., Backbone]] = {"swin": SwinBackbone, "vit": ViTBackbone}


def build_backbone(name: str, **kwargs) -> Backbone:
    """Build a backbone by registry name.

    Args:
        name: a key of :data:`BACKBONES` (``"swin"`` or ``"vit"``).
        **kwargs: the backbone's constructor arguments (``size``, ...).

    Raises:
        ValueError: for an unknown name.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; expected one of {sorted(BACKBONES)}")
    backbone = BACKBONES[name](**kwargs)
    n_params = sum(p.numel() for p in backbone.parameters())
    logger.debug("built backbone %s (%s) with %d parameters", name, kwargs, n_params)
    return backbone
