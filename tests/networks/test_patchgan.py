import pytest
import torch

from medssl3d.networks.patchgan import PATCHGAN_VARIANTS, PatchDiscriminator3D


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return PatchDiscriminator3D(base_channels=4)


def _convs(net):
    return [m for m in net.modules() if isinstance(m, torch.nn.Conv3d)]


@pytest.mark.parametrize(("side", "grid"), [(64, 6), (96, 10)])
def test_output_grid_shape(small, side, grid):
    # k=4, p=1: three stride-2 convs halve the side, two stride-1 convs take 1 voxel each: s/8 - 2
    with torch.no_grad():
        out = small(torch.rand(2, 1, side, side, side))
    assert out.shape == (2, 1, grid, grid, grid)


def test_default_layout_is_pix2pix():
    net = PatchDiscriminator3D()
    convs = _convs(net)
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert [c.stride for c in convs] == [(2, 2, 2)] * 3 + [(1, 1, 1)] * 2
    assert all(c.kernel_size == (4, 4, 4) and c.padding == (1, 1, 1) for c in convs)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.InstanceNorm3d)]
    assert [n.num_features for n in norms] == [128, 256, 512]  # none after the first conv
    assert PATCHGAN_VARIANTS["pix2pix"] == (4, None)


def test_official_variant_has_kernel_3_and_normal_002_weights():
    torch.manual_seed(0)
    net = PatchDiscriminator3D.from_variant("official", base_channels=8)
    convs = _convs(net)
    assert [c.out_channels for c in convs] == [8, 16, 32, 64, 1]
    assert all(c.kernel_size == (3, 3, 3) and c.padding == (1, 1, 1) for c in convs)
    weights = torch.cat([c.weight.detach().flatten() for c in convs])  # ~80k draws: std within 1 % of 0.02
    assert weights.mean().abs() < 0.001 and weights.std().item() == pytest.approx(0.02, rel=0.02)
    default_first = _convs(PatchDiscriminator3D.from_variant("pix2pix", base_channels=8))[0]
    assert default_first.weight.std() > 0.05  # PyTorch's default init of a 27-input conv is much wider
    with torch.no_grad():  # k=3, p=1: only the three stride-2 convs shrink the side: s/8
        assert net(torch.rand(1, 1, 64, 64, 64)).shape == (1, 1, 8, 8, 8)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_layers"):
        PatchDiscriminator3D(num_layers=0)
    with pytest.raises(ValueError, match="init_std"):
        PatchDiscriminator3D(init_std=0.0)
    with pytest.raises(ValueError, match="'huge'"):
        PatchDiscriminator3D.from_variant("huge")
