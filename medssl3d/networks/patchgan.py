"""3D PatchGAN discriminator (pix2pix's ``NLayerDiscriminator``, Isola et al., CVPR 2017, in 3D)."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["DEFAULT_BASE_CHANNELS", "DEFAULT_NUM_LAYERS", "PatchDiscriminator3D"]

DEFAULT_BASE_CHANNELS = 64
DEFAULT_NUM_LAYERS = 3  # stride-2 convolutions: 64 -> 128 -> 256, then the stride-1 512 one
MAX_CHANNEL_MULT = 8  # channels stop growing at 8 x base, as pix2pix
KERNEL_SIZE = 4
PADDING = 1
NEGATIVE_SLOPE = 0.2


class PatchDiscriminator3D(nn.Module):
    """Classify every receptive-field patch of a volume as real or restored.

    Layers (k = 4, padding 1): a stride-2 conv to ``base`` channels with LeakyReLU(0.2), then
    ``num_layers − 1`` stride-2 convs doubling the channels and one stride-1 conv doubling them
    again, each with InstanceNorm (no affine, as pix2pix) and LeakyReLU(0.2), then a stride-1
    conv to one channel. With the defaults: 64 → 128 → 256 → 512 → 1; a 64³ input gives a 6³
    grid of scores, a 96³ one a 10³ grid. Outputs are raw scores (for the least-squares loss).

    Args:
        in_channels: channels of the judged volumes.
        base_channels: width of the first layer.
        num_layers: number of stride-2 convolutions.

    Raises:
        ValueError: ``in_channels``, ``base_channels`` or ``num_layers`` below 1.
    """

    def __init__(self, in_channels: int = 1, base_channels: int = DEFAULT_BASE_CHANNELS,
                 num_layers: int = DEFAULT_NUM_LAYERS) -> None:
        super().__init__()
        if min(in_channels, base_channels, num_layers) < 1:
            raise ValueError(
                f"in_channels, base_channels and num_layers must be >= 1, got {in_channels}, "
                f"{base_channels}, {num_layers}"
            )
        layers: list[nn.Module] = [
            nn.Conv3d(in_channels, base_channels, KERNEL_SIZE, stride=2, padding=PADDING),
            nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True),
        ]
        channels = base_channels
        for i in range(1, num_layers + 1):
            stride = 2 if i < num_layers else 1
            out = base_channels * min(2**i, MAX_CHANNEL_MULT)
            layers += [
                nn.Conv3d(channels, out, KERNEL_SIZE, stride=stride, padding=PADDING),
                nn.InstanceNorm3d(out),
                nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True),
            ]
            channels = out
        layers.append(nn.Conv3d(channels, 1, KERNEL_SIZE, stride=1, padding=PADDING))
        self.model = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Score ``x`` (B, C, D, H, W): returns (B, 1, d, h, w) patch scores."""
        return self.model(x)
