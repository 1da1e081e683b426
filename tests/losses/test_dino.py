import math

import pytest
import torch
import torch.nn.functional as F

import medssl3d.losses.dino as dino_module
from medssl3d.losses.dino import DINOLoss


def _plain(student, teacher, center, tau_s, tau_t):
    """H(t, s) written out with explicit loops over rows, as in docs/methods.md ("Shared pieces")."""
    total = 0.0
    for s_row, t_row in zip(student, teacher, strict=True):
        p = torch.exp((t_row - center) / tau_t) / torch.exp((t_row - center) / tau_t).sum()
        log_q = s_row / tau_s - torch.logsumexp(s_row / tau_s, dim=0)
        total += -(p * log_q).sum()
    return total / len(student)


def test_known_answer_crossed_views():
    torch.manual_seed(0)
    loss = DINOLoss(out_dim=7, student_temp=0.1, center_momentum=0.9)
    s1, s2, t1, t2 = (torch.randn(3, 7) for _ in range(4))
    with torch.no_grad():
        loss.center.copy_(torch.randn(1, 7) * 0.1)
    center = loss.center[0].clone()
    got = loss([s1, s2], [t1, t2], teacher_temp=0.04)
    want = (_plain(s2, t1, center, 0.1, 0.04) + _plain(s1, t2, center, 0.1, 0.04)) / 2
    torch.testing.assert_close(got, want)


def test_all_pairs_and_token_rows():
    torch.manual_seed(1)
    loss = DINOLoss(out_dim=5, cross_views=False).eval()
    s = torch.randn(2, 3, 5)  # (B, N, K) tokens
    t = torch.randn(2, 3, 5)
    got = loss(s, t, teacher_temp=0.07)
    want = _plain(s.reshape(6, 5), t.reshape(6, 5), torch.zeros(5), 0.1, 0.07)
    torch.testing.assert_close(got, want)


def test_center_update_in_training_only():
    loss = DINOLoss(out_dim=4, center_momentum=0.9)
    t1 = torch.tensor([[1.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0]])
    t2 = torch.tensor([[0.0, 2.0, 0.0, 0.0], [0.0, 2.0, 0.0, 4.0]])
    loss([t1, t2], [t1, t2])
    # c <- 0.9 * 0 + 0.1 * mean over the four teacher rows
    torch.testing.assert_close(loss.center, torch.tensor([[0.1, 0.1, 0.0, 0.1]]))
    loss([t1, t2], [t1, t2], update_center=False)  # e.g. a later micro-batch of the same step
    torch.testing.assert_close(loss.center, torch.tensor([[0.1, 0.1, 0.0, 0.1]]))
    loss.eval()
    loss([t1, t2], [t1, t2])
    torch.testing.assert_close(loss.center, torch.tensor([[0.1, 0.1, 0.0, 0.1]]))
    assert "center" in loss.state_dict()


def test_center_is_all_reduced(monkeypatch):
    calls = []

    def fake_all_reduce_mean(tensor):
        calls.append(tensor.clone())
        return tensor.fill_(10.0)  # as if the other ranks' means were larger

    monkeypatch.setattr(dino_module, "all_reduce_mean", fake_all_reduce_mean)
    loss = DINOLoss(out_dim=3, center_momentum=0.5)
    loss([torch.zeros(2, 3), torch.zeros(2, 3)], [torch.ones(2, 3), torch.ones(2, 3)])
    assert len(calls) == 1 and calls[0].shape == (1, 3)
    torch.testing.assert_close(loss.center, torch.full((1, 3), 5.0))


def test_gradient_reaches_student_only_and_perfect_match_is_the_entropy():
    torch.manual_seed(2)
    loss = DINOLoss(out_dim=6, student_temp=0.1).eval()
    t = torch.randn(4, 6, requires_grad=True)
    s = torch.randn(4, 6, requires_grad=True)
    loss([s, s], [t, t], teacher_temp=0.1).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None
    # student equal to the (uncentred) teacher at the same temperature: H(p, p) = entropy(p)
    p = F.softmax(t.detach() / 0.1, dim=-1)
    entropy = -(p * p.log()).sum(-1).mean()
    torch.testing.assert_close(loss([t.detach()] * 2, [t.detach()] * 2, teacher_temp=0.1), entropy)
    # uniform student: H = log K whatever the teacher
    uniform = loss([torch.zeros(4, 6)] * 2, [t.detach()] * 2, teacher_temp=0.04)
    assert uniform.item() == pytest.approx(math.log(6), rel=1e-5)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="student_temp"):
        DINOLoss(4, student_temp=0.0)
    with pytest.raises(ValueError, match="center_momentum"):
        DINOLoss(4, center_momentum=1.5)
    loss = DINOLoss(4)
    with pytest.raises(ValueError, match="pairs"):
        loss(torch.zeros(2, 4), torch.zeros(2, 4))  # one view crossed with itself: nothing to compare
    with pytest.raises(ValueError, match="teacher_temp"):
        loss([torch.zeros(2, 4)] * 2, [torch.zeros(2, 4)] * 2, teacher_temp=0.0)
    with pytest.raises(ValueError, match=r"\(\.\.\., 4\)"):
        loss([torch.zeros(2, 5)] * 2, [torch.zeros(2, 5)] * 2)
