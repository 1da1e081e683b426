import pytest
import torch

from medssl3d.networks.compose import Composition, Decomposition, DenseHead, pixel_shuffle_3d, unfold_2x2x2


def _ramp(side):
    """(1, 3, side, side, side): each token holds its own (z, y, x)."""
    axis = torch.arange(side, dtype=torch.float32)
    return torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"))[None]


def test_unfold_puts_block_member_dz_dy_dx_in_channel_block_of_that_raster_index():
    x = _ramp(4)
    blocks = unfold_2x2x2(x)
    assert blocks.shape == (1, 24, 2, 2, 2)
    for z, y, x_ in [(0, 0, 0), (1, 0, 1), (1, 1, 0)]:
        for dz in (0, 1):
            for dy in (0, 1):
                for dx in (0, 1):
                    member = (dz * 2 + dy) * 2 + dx
                    got = blocks[0, member * 3 : member * 3 + 3, z, y, x_]
                    want = torch.tensor([2 * z + dz, 2 * y + dy, 2 * x_ + dx], dtype=torch.float32)
                    torch.testing.assert_close(got, want)


def test_pixel_shuffle_places_channel_block_at_its_sub_cell():
    # Token (z, y, x) of a 2^3 map carries, in block (dz, dy, dx), the coordinates of sub-cell 2*(z,y,x)+(dz,dy,dx):
    # the shuffled map must then be the ramp of the fine grid.
    coarse = _ramp(2)
    blocks = []
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                blocks.append(2 * coarse + torch.tensor([dz, dy, dx], dtype=torch.float32).view(1, 3, 1, 1, 1))
    fine = pixel_shuffle_3d(torch.cat(blocks, dim=1))
    torch.testing.assert_close(fine, _ramp(4))


def test_shuffle_and_unfold_are_inverse():
    x = torch.randn(2, 5, 4, 6, 2)
    torch.testing.assert_close(pixel_shuffle_3d(unfold_2x2x2(x)), x)
    y = torch.randn(2, 16, 3, 2, 1)
    torch.testing.assert_close(unfold_2x2x2(pixel_shuffle_3d(y)), y)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="even"):
        unfold_2x2x2(torch.zeros(1, 2, 3, 4, 4))
    with pytest.raises(ValueError, match="8C"):
        pixel_shuffle_3d(torch.zeros(1, 12, 2, 2, 2))


def test_composition_of_decomposition_has_the_right_shapes_and_both_are_differentiable():
    torch.manual_seed(0)
    dim, n = 6, 4
    comp, decomp = Composition(dim), Decomposition(dim)
    x = torch.randn(2, dim, n, n, n, requires_grad=True)
    fine = decomp(x)
    assert fine.shape == (2, dim, 2 * n, 2 * n, 2 * n)
    back = comp(fine)
    assert back.shape == x.shape
    assert comp(x).shape == (2, dim, n // 2, n // 2, n // 2)
    back.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for module in (comp, decomp):
        for name, p in module.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_composition_is_local_to_its_block():
    # Changing one small token changes only the composed feature of its block.
    torch.manual_seed(0)
    comp = Composition(4).eval()
    x = torch.randn(1, 4, 4, 4, 4)
    y = x.clone()
    y[0, :, 3, 2, 1] += 1.0  # block (1, 1, 0)
    changed = (comp(x) - comp(y)).abs().sum(dim=1)[0] > 1e-6
    assert changed.nonzero().tolist() == [[1, 1, 0]]


def test_dense_head_gives_unit_tokens_in_raster_order_and_uses_batch_stats_in_eval():
    torch.manual_seed(0)
    head = DenseHead(8, hidden_dim=16, out_dim=5)
    x = torch.randn(2, 8, 3, 2, 4)
    out = head(x)
    assert out.shape == (2, 24, 5)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2, 24))
    # no running statistics: eval mode gives the same output as training mode
    torch.testing.assert_close(head.eval()(x), out)
    assert not any("running" in name for name, _ in head.named_buffers())


def test_dense_head_token_order_is_the_zyx_raster():
    torch.manual_seed(0)
    head = DenseHead(3, out_dim=3, n_layers=1)
    with torch.no_grad():
        head.net[0].weight.copy_(torch.eye(3))
        head.net[0].bias.zero_()
    x = torch.rand(1, 3, 2, 3, 4) + 0.1
    out = head(x)
    for z, y, x_ in [(0, 0, 0), (1, 2, 3), (0, 1, 2)]:
        t = (z * 3 + y) * 4 + x_
        torch.testing.assert_close(out[0, t], torch.nn.functional.normalize(x[0, :, z, y, x_], dim=0))
