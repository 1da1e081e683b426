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
