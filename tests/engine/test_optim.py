import pytest
import torch
from torch import nn

from medssl3d.engine.optim import DECAY_KEY, build_adamw, clip_gradients, param_groups, set_weight_decay


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 3)
        self.norm = nn.LayerNorm(2)
        self.token = nn.Parameter(torch.zeros(2))
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)
        self.aux = nn.Linear(2, 2)


def test_no_decay_on_bias_and_1d_and_exclusions():
    net = Net()
    groups = param_groups(net, 0.04, exclude=net.aux.parameters())
    decay, no_decay = groups
    assert decay[DECAY_KEY] and not no_decay[DECAY_KEY]
    assert {id(p) for p in decay["params"]} == {id(net.conv.weight)}
    assert {id(p) for p in no_decay["params"]} == {
        id(net.conv.bias), id(net.norm.weight), id(net.norm.bias), id(net.token)
    }
    assert decay["weight_decay"] == 0.04 and no_decay["weight_decay"] == 0.0


def test_scheduled_weight_decay_only_on_decay_group():
    opt = build_adamw(param_groups(Net(), 0.04), lr=1e-3)
    set_weight_decay(opt, 0.3)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.3, 0.0]


def test_clip_gradients_to_norm():
    p = nn.Parameter(torch.zeros(4))
    p.grad = torch.full((4,), 3.0)  # norm 6
    norm = clip_gradients([p], 3.0)
    assert float(norm) == pytest.approx(6.0)
    assert float(p.grad.norm()) == pytest.approx(3.0, rel=1e-5)
    assert clip_gradients([p], None) is None


def test_nothing_to_optimise_raises():
    net = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        build_adamw(param_groups(net, 0.1), lr=1e-3)


def test_adamw_is_fused_and_steps_as_the_per_parameter_loop():
    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Conv3d(1, 2, 3), nn.GroupNorm(1, 2)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    fused = build_adamw(param_groups(nets[0], 0.04), lr=1e-2)
    loop = torch.optim.AdamW(param_groups(nets[1], 0.04), lr=1e-2)
    assert fused.defaults["fused"] and not loop.defaults["fused"]
    x = torch.randn(2, 1, 4, 4, 4)
    for _ in range(3):
        for net, opt in zip(nets, (fused, loop), strict=True):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
