import pytest
import torch

from medssl3d.networks.conv_decoder import ConvDecoder


@pytest.mark.parametrize("out_channels", [1, 2])
def test_forward_equals_the_layers_in_order(out_channels):
    # forward runs the 1x1x1 head before the last upsampling (they commute); same function
    torch.manual_seed(0)
    decoder = ConvDecoder(32, out_channels, min_channels=4, num_stages=3).double()
    x = torch.randn(2, 32, 3, 2, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = decoder(x)
    assert y.shape == (2, out_channels, 24, 16, 32)
    torch.testing.assert_close(y, decoder.layers(x), rtol=1e-12, atol=1e-12)


def test_stage_widths_halve_down_to_min_channels():
    decoder = ConvDecoder(192, 1, min_channels=12, num_stages=5)
    convs = [m for m in decoder.modules() if isinstance(m, torch.nn.Conv3d)]
    assert [c.out_channels for c in convs] == [96, 48, 24, 12, 12, 1]
    assert decoder.scale == 32
