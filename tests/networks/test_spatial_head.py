import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from medssl3d.networks.spatial_head import SpatialAwareHead


def test_batched_head_equals_a_loop_of_per_position_weight_normalised_layers():
    torch.manual_seed(0)
    n, k, d = 5, 7, 16
    head = SpatialAwareHead(in_dim=12, num_positions=n, num_prototypes=k, hidden_dim=32, bottleneck_dim=d)
    tokens = torch.randn(3, n, 12)
    scores, z = head(tokens)
    assert scores.shape == (3, n, k) and z.shape == (3, n, d)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(3, n))
    expected = []
    for j in range(n):
        layer = weight_norm(nn.Linear(d, k, bias=False), dim=0)
        with torch.no_grad():  # direction v = the head's weight of position j, norm g fixed at 1
            layer.parametrizations.weight.original0.fill_(1.0)
            layer.parametrizations.weight.original1.copy_(head.weight[j])
        expected.append(layer(head.embed(tokens[:, j : j + 1]))[:, 0])
    torch.testing.assert_close(scores, torch.stack(expected, dim=1))
    assert float(scores.abs().max()) <= 1.0 + 1e-5  # cosine scores


def test_gradient_reaches_mlp_and_prototypes_and_bad_shapes_raise():
    head = SpatialAwareHead(in_dim=8, num_positions=4, num_prototypes=3, hidden_dim=16, bottleneck_dim=8)
    head(torch.randn(2, 4, 8))[0].sum().backward()
    assert head.weight.grad is not None and float(head.weight.grad.abs().sum()) > 0
    assert all(p.grad is not None for p in head.mlp.parameters())
    with pytest.raises(ValueError, match="tokens"):
        head(torch.randn(2, 5, 8))
    with pytest.raises(ValueError):
        SpatialAwareHead(in_dim=8, num_positions=4, n_layers=0)
