import pytest
import torch

from medssl3d.networks.patchgan import PatchDiscriminator3D


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return PatchDiscriminator3D(base_channels=4)


@pytest.mark.parametrize(("side", "grid"), [(64, 6), (96, 10)])
def test_output_grid_shape(small, side, grid):
    # k=4, p=1: three stride-2 convs halve the side, two stride-1 convs take 1 voxel each: s/8 - 2
    with torch.no_grad():
        out = small(torch.rand(2, 1, side, side, side))
    assert out.shape == (2, 1, grid, grid, grid)


def test_default_layout_is_pix2pix():
    convs = [m for m in PatchDiscriminator3D().modules() if isinstance(m, torch.nn.Conv3d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert [c.stride for c in convs] == [(2, 2, 2)] * 3 + [(1, 1, 1)] * 2
    norms = [m for m in PatchDiscriminator3D().modules() if isinstance(m, torch.nn.InstanceNorm3d)]
    assert [n.num_features for n in norms] == [128, 256, 512]  # none after the first conv


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_layers"):
        PatchDiscriminator3D(num_layers=0)
