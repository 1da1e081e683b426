import pytest
import torch

from medssl3d.networks.casa import CASA


def test_shapes_and_gradients_reach_query_context_and_weights():
    torch.manual_seed(0)
    casa = CASA(dim=32, num_heads=8, ffn_dim=64, dropout=0.1)
    query = torch.randn(2, 8, 32, requires_grad=True)
    context = torch.randn(2, 27, 32, requires_grad=True)
    out = casa(query, context)
    assert out.shape == (2, 8, 32)
    out.pow(2).sum().backward()
    assert query.grad.abs().sum() > 0 and context.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in casa.parameters())


def test_output_depends_on_the_context_and_is_layer_normalised():
    torch.manual_seed(0)
    casa = CASA(dim=16, num_heads=4, ffn_dim=32, dropout=0.0).eval()
    query = torch.randn(1, 5, 16)
    a, b = casa(query, torch.randn(1, 7, 16)), casa(query, torch.randn(1, 7, 16))
    assert not torch.allclose(a, b)
    torch.testing.assert_close(a.mean(-1), torch.zeros(1, 5), atol=1e-5, rtol=0)


def test_defaults_are_the_paper_block_and_bad_inputs_raise():
    casa = CASA()
    assert casa.attn.num_heads == 8 and casa.attn.embed_dim == 512 and casa.attn.dropout == 0.1
    assert casa.ffn[0].out_features == 2048 and casa.ffn[-1].out_features == 512
    with pytest.raises(ValueError, match="divisible"):
        CASA(dim=30, num_heads=8)
    with pytest.raises(ValueError, match="CASA expects"):
        casa(torch.randn(1, 4, 512), torch.randn(2, 4, 512))
