import math

import pytest
import torch
import torch.nn.functional as F

from medssl3d.losses.balanced_bce import BalancedBCEWithLogitsLoss


def test_known_answer():
    loss = BalancedBCEWithLogitsLoss(alpha=0.9, reduction="none")
    x = torch.tensor([0.0, 2.0, -1.0])
    y = torch.tensor([1.0, 0.0, 0.25])
    sig = torch.sigmoid(x)
    want = -(0.9 * y * torch.log(sig) + 0.1 * (1 - y) * torch.log(1 - sig))
    torch.testing.assert_close(loss(x, y), want)
    assert loss(torch.tensor([0.0]), torch.tensor([1.0])).item() == pytest.approx(0.9 * math.log(2))


def test_half_alpha_is_half_the_plain_bce_and_reductions():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 7)
    y = torch.rand(2, 5, 7)
    plain = F.binary_cross_entropy_with_logits(x, y)
    torch.testing.assert_close(BalancedBCEWithLogitsLoss(0.5)(x, y), 0.5 * plain)
    torch.testing.assert_close(BalancedBCEWithLogitsLoss(0.5, reduction="sum")(x, y), 0.5 * plain * x.numel())


def test_alpha_weights_positives_against_negatives():
    x = torch.zeros(4)
    pos, neg = torch.ones(4), torch.zeros(4)
    loss = BalancedBCEWithLogitsLoss(alpha=0.99)
    assert loss(x, pos).item() == pytest.approx(99 * loss(x, neg).item(), rel=1e-5)


def test_large_logits_stay_finite_with_finite_gradients():
    x = torch.tensor([100.0, -100.0, 50.0], requires_grad=True)
    y = torch.tensor([0.0, 1.0, 0.5])
    out = BalancedBCEWithLogitsLoss(0.9)(x, y)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(x.grad).all()
    # a confident wrong answer costs about |x| times its weight
    assert out.item() == pytest.approx((0.1 * 100 + 0.9 * 100 + (0.9 * 0.5 * 0 + 0.1 * 0.5 * 50)) / 3, rel=1e-3)


@pytest.mark.parametrize("kwargs", [{"alpha": -0.1}, {"alpha": 1.1}, {"reduction": "max"}])
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        BalancedBCEWithLogitsLoss(**kwargs)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        BalancedBCEWithLogitsLoss()(torch.zeros(2, 3), torch.zeros(3, 2))
