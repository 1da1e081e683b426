import pytest
import torch

from medssl3d.losses.barlow import BarlowTwinsLoss

# Columns of a 4x4 Hadamard matrix without the constant one: zero mean, unit (biased) variance, orthogonal.
DECORRELATED = torch.tensor([[1.0, 1.0, 1.0], [-1.0, 1.0, -1.0], [1.0, -1.0, -1.0], [-1.0, -1.0, 1.0]])


def test_zero_for_identical_decorrelated_embeddings():
    loss = BarlowTwinsLoss(eps=0.0)
    assert loss(DECORRELATED, DECORRELATED.clone()).item() == pytest.approx(0.0, abs=1e-6)
    # scale and shift per feature do not matter (each feature is standardised over the batch)
    z = DECORRELATED * torch.tensor([2.0, 0.5, 3.0]) + torch.tensor([1.0, -4.0, 0.2])
    assert loss(z, z).item() == pytest.approx(0.0, abs=1e-5)


def test_known_answer_for_correlated_features():
    # feature 1 equals feature 0: C has ones at (0, 1) and (1, 0) -> loss = lambda * 2
    z = DECORRELATED[:, [0, 0, 2]]
    assert BarlowTwinsLoss(0.5, eps=0.0)(z, z).item() == pytest.approx(1.0, abs=1e-6)
    # anti-correlated views: C_ii = -1 on every diagonal entry -> 3 * (1 - (-1))^2 = 12
    assert BarlowTwinsLoss(0.0, eps=0.0)(DECORRELATED, -DECORRELATED).item() == pytest.approx(12.0, abs=1e-5)


def test_gradient_flows_and_no_distributed_needed():
    z1 = torch.randn(8, 16, requires_grad=True)
    loss = BarlowTwinsLoss()(z1, torch.randn(8, 16))
    loss.backward()
    assert loss.item() > 0 and z1.grad.abs().sum() > 0


def test_batch_of_one_and_bad_shapes_raise():
    with pytest.raises(ValueError, match="at least 2"):
        BarlowTwinsLoss()(torch.randn(1, 4), torch.randn(1, 4))
    with pytest.raises(ValueError, match=r"\(B, C\)"):
        BarlowTwinsLoss()(torch.randn(4, 3), torch.randn(4, 2))
