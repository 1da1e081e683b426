import math

import pytest
import torch
import torch.nn.functional as F

from medssl3d.losses.balanced_bce import BalancedBCEWithLogitsLoss


def test_known_answer_is_torchvision_focal_loss_with_gamma_0():
    # torchvision.ops.sigmoid_focal_loss(x, t, alpha, gamma=0): (alpha t + (1 - alpha)(1 - t)) * BCE(x, t)
    loss = BalancedBCEWithLogitsLoss(alpha=0.9, reduction="none")
    x = torch.tensor([0.0, 2.0, -1.0, 3.0])
    t = torch.tensor([1.0, 0.0, 0.25, 0.6])
    p = torch.sigmoid(x)
    bce = -(t * torch.log(p) + (1 - t) * torch.log(1 - p))
    want = (0.9 * t + 0.1 * (1 - t)) * bce
    torch.testing.assert_close(loss(x, t), want)
    # one element by hand: x = 0, t = 0.25 -> alpha_t = 0.3, BCE = log 2
    assert loss(torch.tensor([0.0]), torch.tensor([0.25])).item() == pytest.approx(0.3 * math.log(2))
    assert loss(torch.tensor([0.0]), torch.tensor([1.0])).item() == pytest.approx(0.9 * math.log(2))


@pytest.mark.parametrize("alpha", [0.9, 0.99])
def test_per_element_optimum_is_the_soft_target(alpha):
    # The Gaussian targets of ACE: exp(-d^2 / 2) at d^2 = 1, 2, 4, 6 cells^2, and a peak and a zero-ish tail.
    targets = torch.tensor([math.exp(-0.5), math.exp(-1.0), math.exp(-2.0), math.exp(-4.0), math.exp(-6.0), 0.97])
    x = torch.linspace(-12.0, 12.0, 24001, dtype=torch.float64)  # step 1e-3: sigma moves by <= 2.5e-4 a step
    loss = BalancedBCEWithLogitsLoss(alpha, reduction="none")
    values = loss(x[:, None].expand(-1, len(targets)), targets[None, :].double().expand(len(x), -1))
    best = torch.sigmoid(x[values.argmin(dim=0)])
    torch.testing.assert_close(best.float(), targets, atol=5e-4, rtol=0)


def test_hard_targets_reduce_to_the_balanced_log_likelihood():
    torch.manual_seed(0)
    x = torch.randn(50)
    t = (torch.rand(50) > 0.5).float()
    want = -(0.9 * t * F.logsigmoid(x) + 0.1 * (1 - t) * F.logsigmoid(-x))
    torch.testing.assert_close(BalancedBCEWithLogitsLoss(0.9, reduction="none")(x, t), want)


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
    # a confident wrong answer costs about |x| times alpha_t; t = 0.5 at x = 50: alpha_t 0.5, BCE ~ 25
    assert out.item() == pytest.approx((0.1 * 100 + 0.9 * 100 + 0.5 * 25) / 3, rel=1e-3)


@pytest.mark.parametrize("kwargs", [{"alpha": -0.1}, {"alpha": 1.1}, {"reduction": "max"}])
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        BalancedBCEWithLogitsLoss(**kwargs)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        BalancedBCEWithLogitsLoss()(torch.zeros(2, 3), torch.zeros(3, 2))


def test_bf16_logits_are_scored_in_float32_against_unrounded_targets():
    x = torch.tensor([0.5, -1.0, 2.0]).bfloat16()
    t = torch.tensor([math.exp(-0.5), math.exp(-2.0), 0.123456])
    got = BalancedBCEWithLogitsLoss(0.9, reduction="none")(x, t)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, BalancedBCEWithLogitsLoss(0.9, reduction="none")(x.float(), t))
