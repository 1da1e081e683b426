import pytest
import torch

from medssl3d.losses.lsgan import LSGANLoss


def test_known_answers():
    loss = LSGANLoss()
    pred = torch.tensor([[0.0, 1.0], [2.0, 0.5]])
    assert loss(pred, True).item() == pytest.approx((1 + 0 + 1 + 0.25) / 4)
    assert loss(pred, False).item() == pytest.approx((0 + 1 + 4 + 0.25) / 4)
    real, fake = torch.ones(1, 1, 3, 3, 3), torch.zeros(1, 1, 3, 3, 3)
    assert loss.discriminator(real, fake).item() == 0.0  # a perfect discriminator
    assert loss.discriminator(fake, real).item() == pytest.approx(1.0)  # 0.5 * (1 + 1)


def test_custom_labels():
    assert LSGANLoss(real_label=0.9, fake_label=0.1)(torch.full((4,), 0.9), True).item() == pytest.approx(0.0)
