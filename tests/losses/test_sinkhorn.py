import math

import pytest
import torch

from medssl3d.losses.sinkhorn import sinkhorn_knopp


@pytest.mark.parametrize("n,k", [(64, 16), (216, 256)])
def test_marginals_after_the_iterations(n, k):
    torch.manual_seed(0)
    scores = torch.rand(n, k) * 2 - 1  # cosine-like scores; / 0.05 spans e^-20 .. e^20
    q = sinkhorn_knopp(scores, epsilon=0.05, iterations=100)
    assert bool((q >= 0).all()) and torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(dim=1), torch.ones(n), atol=1e-3, rtol=0)
    torch.testing.assert_close(q.sum(dim=0), torch.full((k,), n / k), atol=1e-3, rtol=0)


def test_default_three_iterations_give_exact_rows_and_move_columns_towards_balance():
    torch.manual_seed(1)
    scores = torch.randn(64, 16) * 0.3
    q = sinkhorn_knopp(scores)  # epsilon 0.05, 3 iterations
    torch.testing.assert_close(q.sum(dim=1), torch.ones(64), atol=1e-5, rtol=0)
    plain = torch.softmax(scores / 0.05, dim=1)
    target = torch.full((16,), 64 / 16)
    assert (q.sum(0) - target).abs().sum() < (plain.sum(0) - target).abs().sum()


def test_uniform_scores_give_the_uniform_plan_and_bad_input_raises():
    q = sinkhorn_knopp(torch.zeros(8, 4))
    torch.testing.assert_close(q, torch.full((8, 4), 0.25))
    assert math.isclose(float(sinkhorn_knopp(torch.full((3, 3), 50.0)).sum()), 3.0, rel_tol=1e-5)
    with pytest.raises(ValueError):
        sinkhorn_knopp(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError):
        sinkhorn_knopp(torch.zeros(2, 3), epsilon=0.0)
