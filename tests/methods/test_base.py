import pytest
import torch
from torch import nn

from medssl3d.methods.base import Auxiliary, SSLMethod, StepInfo, make_teacher


class FakeBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(2, 2)
        self.drop = nn.Dropout(0.5)
        self.use_checkpoint = False

    def export_state_dict(self, target):
        return {f"{target}.proj.weight": self.proj.weight.detach()}


class Tiny(SSLMethod):
    name = "tiny"
    backbone_name = "fake"

    def __init__(self, with_teacher=True):
        super().__init__()
        self.student = nn.Module()
        self.student.backbone = FakeBackbone()
        if with_teacher:
            self.teacher = make_teacher(self.student)

    def forward(self, batch, step):
        y = self.run_student.__self__.student.backbone.proj(batch["x"])
        return {"loss": y.sum(), "parts": {}}


def test_step_info_progress():
    assert StepInfo(step=25, total_steps=100, epoch=0).progress == pytest.approx(0.25)
    assert StepInfo(step=150, total_steps=100, epoch=3).progress == 1.0
    assert StepInfo(step=0, total_steps=0, epoch=0).progress == 1.0
    with pytest.raises(AttributeError):
        StepInfo(1, 2, 0).step = 3  # frozen


def test_make_teacher_is_a_frozen_eval_copy():
    m = Tiny()
    assert all(not p.requires_grad for p in m.teacher.parameters())
    assert all(p.requires_grad for p in m.student.parameters())
    assert m.teacher.backbone.proj.weight is not m.student.backbone.proj.weight
    torch.testing.assert_close(m.teacher.backbone.proj.weight, m.student.backbone.proj.weight)
    m.train()
    assert m.student.training and not m.teacher.training and not m.teacher.backbone.drop.training


def test_default_hooks():
    m = Tiny()
    assert m.momentum_pairs() == [(m.student, m.teacher)]
    assert Tiny(with_teacher=False).momentum_pairs() == []
    assert m.auxiliary_objectives() == [] and m.last_layer_parameters() == []
    assert m.set_grad_checkpointing(True) == 1 and m.student.backbone.use_checkpoint
    assert list(m.export_state_dict("swinunetr")) == ["swinunetr.proj.weight"]


def test_export_source_picks_the_teacher_or_the_student_backbone():
    m = Tiny()
    with torch.no_grad():
        m.teacher.backbone.proj.weight.fill_(7.0)
    assert m.default_export_source() == "teacher"
    assert torch.equal(m.export_state_dict("unetr", source="teacher")["unetr.proj.weight"], torch.full((2, 2), 7.0))
    assert torch.equal(m.export_state_dict("unetr")["unetr.proj.weight"], m.student.backbone.proj.weight)
    student_only = Tiny(with_teacher=False)
    assert student_only.default_export_source() == "student"
    with pytest.raises(ValueError, match="teacher has no backbone"):
        student_only.export_state_dict("unetr", source="teacher")
    with pytest.raises(ValueError, match="'ema'"):
        m.export_state_dict("unetr", source="ema")


def test_student_runner_routes_calls_without_changing_state_dict():
    m = Tiny()
    keys = list(m.state_dict())
    calls = []

    class Wrapper(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args):
            calls.append(args)
            return self.module.backbone.proj(*args)

    m.student.forward = lambda x: m.student.backbone.proj(x)
    m.set_student_runner(Wrapper(m.student))
    m.run_student(torch.ones(1, 2))
    assert len(calls) == 1 and list(m.state_dict()) == keys
    m.set_student_runner(None)
    m.run_student(torch.ones(1, 2))
    assert len(calls) == 1


def test_abstract_forward_and_missing_backbone():
    class NoForward(SSLMethod):
        pass

    with pytest.raises(TypeError):
        NoForward()

    class NoBackbone(Tiny):
        def __init__(self):
            SSLMethod.__init__(self)
            self.student = nn.Linear(2, 2)

    with pytest.raises(ValueError, match="no backbone"):
        NoBackbone().export_state_dict("unetr")


def test_auxiliary_is_a_small_record():
    critic = nn.Linear(2, 1)
    aux = Auxiliary("critic", critic, lambda ps: torch.optim.Adam(ps, lr=2e-4), lambda b, o, s: o["loss"])
    assert aux.clip_grad is None and aux.module is critic
    assert isinstance(aux.make_optimizer(list(critic.parameters())), torch.optim.Adam)
