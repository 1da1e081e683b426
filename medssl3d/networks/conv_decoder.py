"""Light convolutional decoder from a bottleneck feature map back to the input resolution."""

from __future__ import annotations

from monai.networks.blocks import Convolution
from torch import Tensor, nn

__all__ = ["DEFAULT_NUM_STAGES", "ConvDecoder"]

DEFAULT_NUM_STAGES = 5  # a Swin bottleneck has stride 2**5
DEFAULT_NEGATIVE_SLOPE = 0.01  # torch's LeakyReLU default, as the reference
KERNEL_SIZE = 3
UPSAMPLE_FACTOR = 2
UPSAMPLE_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


class ConvDecoder(nn.Module):
    """Stages of [3×3×3 conv → InstanceNorm → LeakyReLU → ×2 upsampling], then a 1×1×1 conv.

    The reconstruction head of Swin UNETR self-supervised pretraining (Tang et al., CVPR 2022,
    ``SSLHead`` with ``upsample="vae"``): channels halve at every stage from ``in_channels`` but
    never below ``min_channels`` (for a Swin bottleneck of ``16 f`` channels and 5 stages:
    ``8f, 4f, 2f, f, f``), and the resolution doubles (trilinear, ``align_corners=False``).

    Args:
        in_channels: channels of the bottleneck map.
        out_channels: channels of the output (1 for an intensity volume).
        min_channels: lower bound of the stage widths (the backbone's ``feature_size``).
        num_stages: number of upsampling stages; the output is ``2**num_stages`` times larger.
        spatial_dims: 3 for volumes (1 and 2 also work).
        negative_slope: slope of the LeakyReLU.

    Raises:
        ValueError: a non-positive channel count, ``num_stages < 1`` or unsupported ``spatial_dims``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int = 1,
        min_channels: int = 1,
        num_stages: int = DEFAULT_NUM_STAGES,
        spatial_dims: int = 3,
        negative_slope: float = DEFAULT_NEGATIVE_SLOPE,
    ) -> None:
        super().__init__()
        if min(in_channels, out_channels, min_channels) < 1:
            raise ValueError(
                f"channel counts must be >= 1, got in_channels={in_channels}, "
                f"out_channels={out_channels}, min_channels={min_channels}"
            )
        if num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {num_stages}")
        if spatial_dims not in UPSAMPLE_MODES:
            raise ValueError(f"spatial_dims must be one of {sorted(UPSAMPLE_MODES)}, got {spatial_dims}")
        layers: list[nn.Module] = []
        channels = in_channels
        for stage in range(num_stages):
            width = max(in_channels // 2 ** (stage + 1), min_channels)
            layers.append(
                Convolution(
                    spatial_dims,
                    channels,
                    width,
                    kernel_size=KERNEL_SIZE,
                    norm="instance",
                    act=("leakyrelu", {"negative_slope": negative_slope}),
                )
            )
            layers.append(
                nn.Upsample(
                    scale_factor=UPSAMPLE_FACTOR, mode=UPSAMPLE_MODES[spatial_dims], align_corners=False
                )
            )
            channels = width
        layers.append(Convolution(spatial_dims, channels, out_channels, kernel_size=1, conv_only=True))
        self.layers = nn.Sequential(*layers)
        self.out_channels = out_channels
        self.scale = UPSAMPLE_FACTOR**num_stages

    def forward(self, x: Tensor) -> Tensor:
        """Decode ``x`` (B, in_channels, d, h, w) to (B, out_channels, d·s, h·s, w·s), s = 2**num_stages."""
        *body, upsample, head = self.layers
        for layer in body:
            x = layer(x)
        # The 1×1×1 head and the last upsampling commute (both linear, and the interpolation
        # weights sum to 1, so the bias passes through): the head first upsamples out_channels
        # maps instead of min_channels at the largest size, and convolves 8x fewer voxels.
        return upsample(head(x))
