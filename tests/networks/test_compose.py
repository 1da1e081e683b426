import pytest
import torch

from medssl3d.networks.compose import Composition, Decomposition, DenseHead, pixel_shuffle_3d, unfold_2x2x2


def _ramp(side):
    """(1, 3, side, side, side): each token holds its own index along the last three axes."""
    axis = torch.arange(side, dtype=torch.float32)
    return torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"))[None]


def test_unfold_puts_block_member_o0_o1_o2_in_channel_block_of_that_raster_index():
    x = _ramp(4)
    blocks = unfold_2x2x2(x)
    assert blocks.shape == (1, 24, 2, 2, 2)
    for u0, u1, u2 in [(0, 0, 0), (1, 0, 1), (1, 1, 0)]:
        for o0 in (0, 1):
            for o1 in (0, 1):
                for o2 in (0, 1):
                    member = (o0 * 2 + o1) * 2 + o2
                    got = blocks[0, member * 3 : member * 3 + 3, u0, u1, u2]
                    want = torch.tensor([2 * u0 + o0, 2 * u1 + o1, 2 * u2 + o2], dtype=torch.float32)
                    torch.testing.assert_close(got, want)


def test_pixel_shuffle_places_channel_block_at_its_sub_cell():
    # Token u of a 2^3 map carries, in block (o0, o1, o2), the coordinates of sub-cell 2 u + (o0, o1, o2):
    # the shuffled map must then be the ramp of the fine grid.
    coarse = _ramp(2)
    blocks = []
    for o0 in (0, 1):
        for o1 in (0, 1):
            for o2 in (0, 1):
                blocks.append(2 * coarse + torch.tensor([o0, o1, o2], dtype=torch.float32).view(1, 3, 1, 1, 1))
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


def _bn_relu(y):
    """Training-mode BatchNorm (weight 1, bias 0) over every token of every sample, then ReLU; y (B, C, D, H, W)."""
    mean = y.mean(dim=(0, 2, 3, 4), keepdim=True)
    var = y.var(dim=(0, 2, 3, 4), keepdim=True, unbiased=False)
    return torch.relu((y - mean) / torch.sqrt(var + 1e-5))


def test_dense_head_known_answer_conv_bn_relu_blocks_then_l2():
    torch.manual_seed(0)
    head = DenseHead(4, hidden_dim=6, out_dim=5, n_layers=2)
    x = torch.randn(2, 4, 3, 2, 4)
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features, m.bias) for m in linears] == [(4, 6, None), (6, 5, None)]
    # by hand, as 1x1x1 convolutions on the map
    y = x
    for m in linears:
        y = _bn_relu(torch.einsum("oc,bcdhw->bodhw", m.weight, y))
    want = y / y.norm(dim=1, keepdim=True)
    out = head(x)
    assert out.shape == (2, 5, 3, 2, 4)
    torch.testing.assert_close(out, want)
    assert (out >= 0).all()  # the last block ends in a ReLU, as in the official head
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2, 3, 2, 4))


def test_dense_head_uses_batch_statistics_in_eval_mode_too():
    torch.manual_seed(0)
    head = DenseHead(8, hidden_dim=16, out_dim=5)
    x = torch.randn(2, 8, 3, 2, 4)
    out = head(x)
    torch.testing.assert_close(head.eval()(x), out)
    assert not any("running" in name for name, _ in head.named_buffers())
    assert len([m for m in head.modules() if isinstance(m, torch.nn.BatchNorm1d)]) == 3


def test_dense_head_rejects_no_layers():
    with pytest.raises(ValueError, match="n_layers"):
        DenseHead(4, n_layers=0)
