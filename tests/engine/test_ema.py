import pytest
import torch
from torch import nn

from medssl3d.engine.ema import ema_update
from medssl3d.methods.base import make_teacher


def _pair():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    teacher = make_teacher(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    student.train()(torch.randn(8, 4))  # moves the BatchNorm running stats
    return student, teacher


def test_teacher_moves_by_exactly_m_and_buffers_are_copied():
    student, teacher = _pair()
    before = {k: v.clone() for k, v in teacher.named_parameters()}
    ema_update(student, teacher, 0.9)
    for name, p in teacher.named_parameters():
        expected = 0.9 * before[name] + 0.1 * dict(student.named_parameters())[name]
        torch.testing.assert_close(p, expected, rtol=0, atol=1e-7)
    for name, b in teacher.named_buffers():
        assert torch.equal(b, dict(student.named_buffers())[name])


def test_momentum_one_keeps_teacher_and_zero_copies_student():
    student, teacher = _pair()
    before = [p.clone() for p in teacher.parameters()]
    ema_update(student, teacher, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters(), strict=True))
    ema_update(student, teacher, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(student.parameters(), teacher.parameters(), strict=True))


def test_teacher_never_receives_gradients():
    student, teacher = _pair()
    loss = (student(torch.randn(8, 4)) - teacher(torch.randn(8, 4))).pow(2).sum()
    loss.backward()
    ema_update(student, teacher, 0.5)
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())


def test_mismatched_modules_and_bad_momentum_raise():
    student, teacher = _pair()
    with pytest.raises(ValueError, match="differ"):
        ema_update(student, nn.Linear(4, 3), 0.5)
    with pytest.raises(ValueError, match="momentum"):
        ema_update(student, teacher, 1.5)
