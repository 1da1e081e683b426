"""A toy method and data set for the engine tests; not a real method.

A two-layer 3D conv encoder with a linear head, an EMA teacher and a DINO-like
cross-entropy between a noisy student view and a clean teacher view, on 16³ volumes that hold
one Gaussian blob each (position and width depend on the index).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medssl3d.engine.distributed import all_reduce_mean
from medssl3d.methods.base import Auxiliary, SSLMethod, StepInfo, make_teacher

SIDE = 16


class Jitter:
    """Intensity scaling drawn from its own RandomState, like a MONAI random transform."""

    def __init__(self):
        self.R = np.random.RandomState()

    def set_random_state(self, seed=None, state=None):
        self.R = np.random.RandomState(seed)
        return self

    def __call__(self, x):
        return x * float(self.R.uniform(0.8, 1.2))


class BlobVolumes(torch.utils.data.Dataset):
    """``{"image": (1, 16, 16, 16), "index": int}`` with one Gaussian blob per index."""

    def __init__(self, n=8, side=SIDE, transform=None):
        self.n, self.side, self.transform = n, side, transform

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(1000 + i)
        centre = torch.rand(3, generator=g) * (self.side * 0.5) + self.side * 0.25
        sigma = 1.5 + 2.0 * torch.rand(1, generator=g)
        ax = torch.arange(self.side, dtype=torch.float32)
        zz, yy, xx = torch.meshgrid(ax, ax, ax, indexing="ij")
        d2 = (zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2
        img = torch.exp(-d2 / (2 * sigma**2))[None]
        if self.transform is not None:
            img = self.transform(img)
        return {"image": img, "index": i}


class Student(nn.Module):
    def __init__(self, width=4, out=16):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv3d(1, width, 3, stride=2, padding=1),
            nn.BatchNorm3d(width),
            nn.GELU(),
            nn.Conv3d(width, 2 * width, 3, stride=2, padding=1),
            nn.GELU(),
            nn.AdaptiveAvgPool3d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, out)

    def forward(self, x):
        return self.head(self.backbone(x))


class ToyMethod(SSLMethod):
    """Noisy student view vs clean teacher view, DINO-like cross-entropy with a centre."""

    name = "toy"
    backbone_name = "toy-conv"

    def __init__(self, noise=0.1, record=False, sleep=0.0, nan_at_step=None):
        super().__init__()
        self.student = Student()
        self.teacher = make_teacher(self.student)
        self.register_buffer("centre", torch.zeros(16))
        self.noise, self.record, self.sleep, self.nan_at_step = noise, record, sleep, nan_at_step
        self.seen: list[int] = []

    def last_layer_parameters(self):
        return list(self.student.head.parameters())

    def forward(self, batch, step: StepInfo):
        if self.sleep:
            import time

            time.sleep(self.sleep)
        if self.record:
            self.seen.extend(int(i) for i in batch["index"])
        x = batch["image"]
        s = self.run_student(x + self.noise * torch.randn_like(x))
        with torch.no_grad():
            t = self.teacher(x)
            centre = all_reduce_mean(t.mean(0).detach().clone())
            self.centre.mul_(0.9).add_(0.1 * centre)
        loss = -(F.softmax((t - self.centre) / 0.04, -1) * F.log_softmax(s / 0.1, -1)).sum(-1).mean()
        if self.nan_at_step is not None and step.step >= self.nan_at_step:
            loss = loss * math.nan
        return {"loss": loss, "parts": {"ce": loss.detach(), "progress": torch.tensor(step.progress)}}


class OtherToyMethod(ToyMethod):
    name = "other-toy"


class LinearToy(SSLMethod):
    """Per-sample squared error of a linear map, mean over the batch (for accumulation)."""

    name = "linear-toy"
    backbone_name = "linear"

    def __init__(self):
        super().__init__()
        self.student = nn.Linear(SIDE**3, 3)

    def forward(self, batch, step):
        y = self.run_student(batch["image"].flatten(1))
        loss = ((y - 1.0) ** 2).sum(-1).mean()
        return {"loss": loss, "parts": {}}


class GanToy(ToyMethod):
    """ToyMethod plus a critic with its own optimizer (exercises auxiliary objectives)."""

    name = "gan-toy"

    def __init__(self):
        super().__init__()
        self.critic = nn.Linear(16, 1)

    def forward(self, batch, step):
        out = super().forward(batch, step)
        s = self.student(batch["image"])
        adv = ((self.critic(s) - 1) ** 2).mean()
        out["loss"] = out["loss"] + 0.01 * adv
        out["parts"]["adv"] = adv.detach()
        out["fake"] = s.detach()
        return out

    def auxiliary_objectives(self):
        def critic_loss(batch, outputs, step):
            return {"loss": (self.critic(outputs["fake"]) ** 2).mean(), "parts": {}}

        return [Auxiliary("critic", self.critic, lambda ps: torch.optim.SGD(ps, lr=0.1), critic_loss)]
