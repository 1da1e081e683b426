"""MONAI's ``BasicUNet`` (a 3D U-Net) behind the backbone interface, for DiRA's U-Net preset.

Not a new U-Net: the MONAI network is ``self.net``, run stage by stage so that the bottleneck
map is exposed as tokens and the decoder can be run on its own, like ``SwinBackbone``'s
``forward`` / ``decode``. Weights export with ``BasicUNet``'s own keys.
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.nets import BasicUNet
from torch import Tensor

from medssl3d.networks.backbones import NET_PREFIX, Backbone, BackboneOutput

__all__ = ["DEFAULT_UNET_FEATURES", "UNET_DECODER_MODULES", "UNetBackbone"]

DEFAULT_UNET_FEATURES = (32, 32, 64, 128, 256, 32)  # MONAI BasicUNet's default widths
UNET_DECODER_MODULES = ("upcat_4", "upcat_3", "upcat_2", "upcat_1")
UNET_OUT_MODULE = "final_conv"  # task-specific: never part of the backbone nor of an export
UNET_LEVELS = 5  # conv_0 and down_1..down_4: strides 1, 2, 4, 8, 16
EXPORT_TARGET = "basicunet"


class UNetBackbone(Backbone):
    """MONAI ``BasicUNet`` without its output conv, as an encoder with an optional decoder.

    Args:
        features: the six ``BasicUNet`` widths (five encoder levels, then the last decoder's).
        in_channels: input channels.
        with_decoder: keep ``upcat_4`` .. ``upcat_1`` for :meth:`decode`.

    Raises:
        ValueError: ``features`` not six positive widths.
    """

    export_target = EXPORT_TARGET

    def __init__(self, features: Sequence[int] = DEFAULT_UNET_FEATURES, in_channels: int = 1,
                 with_decoder: bool = True) -> None:
        super().__init__()
        features = tuple(int(f) for f in features)
        if len(features) != UNET_LEVELS + 1 or min(features) < 1:
            raise ValueError(f"features must be {UNET_LEVELS + 1} positive widths, got {features}")
        self.in_channels = in_channels
        self.with_decoder = with_decoder
        self.embed_dim = features[UNET_LEVELS - 1]
        self.decoder_channels = features[UNET_LEVELS]
        self.patch_stride = 2 ** (UNET_LEVELS - 1)
        self.strides = tuple(2**i for i in range(UNET_LEVELS))
        self.net = BasicUNet(spatial_dims=3, in_channels=in_channels, out_channels=1, features=features)
        delattr(self.net, UNET_OUT_MODULE)
        if not with_decoder:
            for name in UNET_DECODER_MODULES:
                delattr(self.net, name)

    def forward(self, x: Tensor) -> BackboneOutput:
        """Run the encoder levels.

        Args:
            x: ``(B, C_in, X, Y, Z)`` (R, A, S axes after RAS orientation), every side divisible by 16.

        Returns:
            features: the five level outputs (strides 1 .. 16), tokens: the last one flattened to
            ``(B, N, features[4])``.

        Raises:
            ValueError: a wrong rank / channel count or a side not divisible by 16.
        """
        self._check_input(x, self.in_channels, 3)
        if any(s % self.patch_stride for s in x.shape[2:]):
            raise ValueError(f"UNetBackbone input {tuple(x.shape[2:])} must be divisible by {self.patch_stride}")
        net = self.net
        feats = [net.conv_0(x)]
        for level in range(1, UNET_LEVELS):
            feats.append(getattr(net, f"down_{level}")(feats[-1]))
        tokens = feats[-1].flatten(2).transpose(1, 2)
        return BackboneOutput(tokens=tokens, features=feats, strides=self.strides, hidden_states=feats)

    def decode(self, x: Tensor, out: BackboneOutput) -> Tensor:
        """``BasicUNet``'s decoder on precomputed levels: ``(B, features[5], X, Y, Z)`` before its out conv.

        Raises:
            RuntimeError: built with ``with_decoder=False``.
        """
        if not self.with_decoder:
            raise RuntimeError("UNetBackbone.decode needs with_decoder=True")
        f, net = out.features, self.net
        u = net.upcat_4(f[4], f[3])
        u = net.upcat_3(u, f[2])
        u = net.upcat_2(u, f[1])
        return net.upcat_1(u, f[0])

    def export_state_dict(self, target: str | None = None) -> dict[str, Tensor]:
        """Weights keyed as MONAI ``BasicUNet`` (its ``final_conv`` excluded).

        Raises:
            ValueError: a target other than ``"basicunet"``.
        """
        if target not in (None, EXPORT_TARGET):
            raise ValueError(f"UNetBackbone exports to {EXPORT_TARGET!r}, not to {target!r}")
        return {k[len(NET_PREFIX):]: v.detach().cpu().clone() for k, v in self.state_dict().items()
                if k.startswith(NET_PREFIX)}
