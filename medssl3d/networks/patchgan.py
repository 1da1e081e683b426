"""3D PatchGAN discriminator (pix2pix's ``NLayerDiscriminator``, Isola et al., CVPR 2017, in 3D).

Two named variants (:data:`PATCHGAN_VARIANTS`), the same layer layout:

- ``"pix2pix"`` (default): kernel 4, PyTorch's default initialisation;
- ``"official"``: official DiRA's ``Discriminator``: kernel 3, convolution weights drawn from
  N(0, 0.02) (its ``weights_init_normal``; biases keep PyTorch's default).
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn

__all__ = ["DEFAULT_BASE_CHANNELS", "DEFAULT_NUM_LAYERS", "PATCHGAN_VARIANTS", "PatchDiscriminator3D",
           "PatchGANVariant"]

DEFAULT_BASE_CHANNELS = 64
DEFAULT_NUM_LAYERS = 3  # stride-2 convolutions: 64 -> 128 -> 256, then the stride-1 512 one
MAX_CHANNEL_MULT = 8  # channels stop growing at 8 x base, as pix2pix
DEFAULT_KERNEL_SIZE = 4
PADDING = 1
NEGATIVE_SLOPE = 0.2


class PatchGANVariant(NamedTuple):
    """Kernel size and weight initialisation of a named PatchGAN variant."""

    kernel_size: int
    init_std: float | None  # None: PyTorch's default initialisation


PATCHGAN_VARIANTS: dict[str, PatchGANVariant] = {
    "pix2pix": PatchGANVariant(kernel_size=DEFAULT_KERNEL_SIZE, init_std=None),
    "official": PatchGANVariant(kernel_size=3, init_std=0.02),
}


class PatchDiscriminator3D(nn.Module):
    """Classify every receptive-field patch of a volume as real or restored.

    Layers (padding 1): a stride-2 conv to ``base`` channels with LeakyReLU(0.2), then
    ``num_layers − 1`` stride-2 convs doubling the channels and one stride-1 conv doubling them
    again, each with InstanceNorm (no affine, as pix2pix) and LeakyReLU(0.2), then a stride-1
    conv to one channel. With the defaults: 64 → 128 → 256 → 512 → 1; at kernel 4 a 64³ input
    gives a 6³ grid of scores and a 96³ one a 10³ grid; at kernel 3, 8³ and 12³. Outputs are raw
    scores (for the least-squares loss).

    Args:
        in_channels: channels of the judged volumes.
        base_channels: width of the first layer.
        num_layers: number of stride-2 convolutions.
        kernel_size: side of every convolution kernel (4 in pix2pix, 3 in official DiRA).
        init_std: draw every convolution weight from N(0, init_std) (official DiRA: 0.02);
            None keeps PyTorch's default initialisation.

    Raises:
        ValueError: ``in_channels``, ``base_channels``, ``num_layers`` or ``kernel_size`` below 1,
            or a non-positive ``init_std``.
    """

    def __init__(self, in_channels: int = 1, base_channels: int = DEFAULT_BASE_CHANNELS,
                 num_layers: int = DEFAULT_NUM_LAYERS, kernel_size: int = DEFAULT_KERNEL_SIZE,
                 init_std: float | None = None) -> None:
        super().__init__()
        if min(in_channels, base_channels, num_layers, kernel_size) < 1:
            raise ValueError(
                f"in_channels, base_channels, num_layers and kernel_size must be >= 1, got {in_channels}, "
                f"{base_channels}, {num_layers}, {kernel_size}"
            )
        if init_std is not None and init_std <= 0:
            raise ValueError(f"init_std must be > 0 (or None), got {init_std}")
        layers: list[nn.Module] = [
            nn.Conv3d(in_channels, base_channels, kernel_size, stride=2, padding=PADDING),
            nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True),
        ]
        channels = base_channels
        for i in range(1, num_layers + 1):
            stride = 2 if i < num_layers else 1
            out = base_channels * min(2**i, MAX_CHANNEL_MULT)
            layers += [
                nn.Conv3d(channels, out, kernel_size, stride=stride, padding=PADDING),
                nn.InstanceNorm3d(out),
                nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True),
            ]
            channels = out
        layers.append(nn.Conv3d(channels, 1, kernel_size, stride=1, padding=PADDING))
        self.model = nn.Sequential(*layers)
        if init_std is not None:
            for m in self.model:
                if isinstance(m, nn.Conv3d):
                    nn.init.normal_(m.weight, 0.0, init_std)

    @classmethod
    def from_variant(cls, variant: str, in_channels: int = 1, base_channels: int = DEFAULT_BASE_CHANNELS,
                     num_layers: int = DEFAULT_NUM_LAYERS) -> PatchDiscriminator3D:
        """The named variant of :data:`PATCHGAN_VARIANTS` ("pix2pix" or "official").

        Raises:
            ValueError: an unknown ``variant`` (the known ones are listed).
        """
        if variant not in PATCHGAN_VARIANTS:
            raise ValueError(f"PatchGAN variant must be one of {sorted(PATCHGAN_VARIANTS)}, got {variant!r}")
        kernel_size, init_std = PATCHGAN_VARIANTS[variant]
        return cls(in_channels, base_channels, num_layers, kernel_size=kernel_size, init_std=init_std)

    def forward(self, x: Tensor) -> Tensor:
        """Score ``x`` (B, C, X, Y, Z): returns (B, 1, x, y, z) patch scores (the same axis order)."""
        return self.model(x)
