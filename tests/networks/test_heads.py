import copy

import pytest
import torch

from medssl3d.networks.heads import DINOHead, ProjectionHead

IN, HIDDEN, BOTTLENECK, K = 24, 32, 16, 40


def _head():
    torch.manual_seed(0)
    return DINOHead(IN, out_dim=K, hidden_dim=HIDDEN, bottleneck_dim=BOTTLENECK)


def test_dino_head_shapes_and_layers():
    head = _head()
    assert head(torch.randn(5, IN)).shape == (5, K)
    assert head(torch.randn(2, 7, IN)).shape == (2, 7, K)
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (IN, HIDDEN),
        (HIDDEN, HIDDEN),
        (HIDDEN, BOTTLENECK),
    ]
    assert sum(isinstance(m, torch.nn.GELU) for m in head.mlp) == 2
    default = DINOHead(8)
    assert default.last_layer.weight.shape == (65536, 256)
    assert default.mlp[0].out_features == 2048
    with pytest.raises(ValueError, match="n_layers"):
        DINOHead(8, n_layers=0)


def test_dino_head_rows_have_unit_norm_and_logits_are_cosines():
    head = _head()
    with torch.no_grad():
        head.last_layer.weight.mul_(torch.rand(K, 1) * 10 + 0.1)  # the raw scale must not matter
    protos = head.prototypes()
    torch.testing.assert_close(protos.norm(dim=1), torch.ones(K))
    logits = head(torch.randn(6, IN))
    assert logits.abs().max() <= 1 + 1e-5
    # a bottleneck vector equal to a prototype scores exactly 1 against it
    z = torch.nn.functional.normalize(head.mlp(torch.randn(1, IN)), dim=-1)
    with torch.no_grad():
        head.last_layer.weight[3] = z[0] * 7.0
    torch.testing.assert_close(torch.nn.functional.linear(z, head.prototypes())[0, 3], torch.tensor(1.0))


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.AdamW])
def test_frozen_last_layer_gets_no_update(opt_cls):
    head = _head()
    head.freeze_last_layer = True
    before = copy.deepcopy(head.state_dict())
    opt = opt_cls(head.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        head(torch.randn(8, IN)).logsumexp(-1).mean().backward()
        assert head.last_layer.weight.grad is not None  # a zero gradient, so DDP sees the parameter
        assert head.last_layer.weight.grad.abs().sum() == 0
        opt.step()
    torch.testing.assert_close(
        head.prototypes(), torch.nn.functional.normalize(before["last_layer.weight"], dim=1)
    )
    assert not torch.equal(head.mlp[0].weight, before["mlp.0.weight"])

    head.freeze_last_layer = False
    opt.zero_grad()
    head(torch.randn(8, IN)).logsumexp(-1).mean().backward()
    opt.step()
    assert not torch.allclose(
        head.prototypes(), torch.nn.functional.normalize(before["last_layer.weight"], dim=1)
    )


def test_projection_head():
    torch.manual_seed(0)
    head = ProjectionHead(IN, out_dim=12, hidden_dim=HIDDEN)
    assert head(torch.randn(4, IN)).shape == (4, 12)
    assert head(torch.randn(2, 5, IN)).shape == (2, 5, 12)
    kinds = [type(m).__name__ for m in head.mlp]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert ProjectionHead(IN, out_dim=12, n_layers=1)(torch.randn(3, IN)).shape == (3, 12)
    head.eval()
    x = torch.randn(2, 5, IN)
    # token rows are projected independently in eval mode
    torch.testing.assert_close(head(x)[1, 2], head(x[1:2, 2])[0])
    with pytest.raises(ValueError, match="n_layers"):
        ProjectionHead(IN, n_layers=0)
