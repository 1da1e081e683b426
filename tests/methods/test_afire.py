from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.data import MetaTensor, list_data_collate
from monai.networks.nets import UNETR
from torch import nn

from medssl3d.data.phantoms import make_phantom
from medssl3d.losses.afire import CategoricalLoss, StructuralLoss
from medssl3d.methods.afire import (
    Afire,
    AfireConfig,
    afire_transforms,
    build_afire,
    config_from_checkpoint,
    config_from_yaml,
    parity_groups,
)
from medssl3d.methods.base import StepInfo, make_teacher
from medssl3d.networks.backbones import BACKBONE_SIZES
from medssl3d.transfer.export import load_pretrained

pytestmark = pytest.mark.usefixtures("one_thread")

PRESETS = Path(__file__).resolve().parents[2] / "configs" / "methods" / "afire.yaml"
TINY = {"backbone_size": "tiny", "img_size": 64, "num_prototypes": 16}
STEP = StepInfo(step=0, total_steps=1, epoch=0)


def _volume(seed=0, shape=(72, 64, 80)):
    image = make_phantom(shape=shape, seed=seed).image
    scaled = np.clip((image + 125.0) / 350.0, 0, 1).astype(np.float32)  # the CT preset's window
    return MetaTensor(torch.from_numpy(scaled)[None], affine=torch.eye(4, dtype=torch.float64))


def _batch(seeds=(0,)):
    t = afire_transforms(64)
    samples = []
    for s in seeds:
        t.set_random_state(s)
        samples.append(t({"image": _volume(s)}))
    return list_data_collate(samples)


@pytest.fixture(scope="module")
def method():
    torch.manual_seed(0)
    return build_afire(**TINY)


# ----------------------------------------------------------------- known answers with stub networks
# A 32^3 grid of 16^3 patches: N = 8 token positions; stub widths: tokens C = 5, feature d = 4, K = 6.
STUB = {"backbone_size": "tiny", "img_size": 32, "num_prototypes": 6, "head_bottleneck_dim": 4}
N, C, D, K, P = 8, 5, 4, 6, 16


def _patch_means(x):
    """(B, C, 32, 32, 32) -> (B, N): the mean of each 16^3 patch, raster order (last axis fastest)."""
    return F.avg_pool3d(x.float().mean(1, keepdim=True), P).flatten(1)


def _fill_patches(values):
    """(B, N) -> (B, 1, 32, 32, 32): every voxel of patch n holds values[:, n]."""
    grid = values.reshape(-1, 1, 2, 2, 2)
    return grid.repeat_interleave(P, 2).repeat_interleave(P, 3).repeat_interleave(P, 4)


class StubBackbone(nn.Module):
    """tokens[b, n] = patch_mean[b, n] * w + v[n]; records every input it gets."""

    def __init__(self, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(C, generator=g))
        self.v = nn.Parameter(torch.randn(N, C, generator=g))
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x)
        return SimpleNamespace(tokens=_patch_means(x)[..., None] * self.w + self.v)


class StubHead(nn.Module):
    """z = normalise(tokens @ a), scores = z against per-position unit prototypes; records its outputs."""

    def __init__(self, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = nn.Parameter(torch.randn(C, D, generator=g))
        self.weight = nn.Parameter(torch.randn(N, K, D, generator=g))
        self.outputs = []

    def forward(self, tokens):
        z = F.normalize(tokens @ self.a, dim=-1)
        scores = torch.einsum("bnd,nkd->bnk", z, F.normalize(self.weight, dim=-1))
        self.outputs.append((scores.detach(), z.detach()))
        return scores, z


class StubDecoder(nn.Module):
    """Each token's patch is filled with tokens @ u (mask ignored); records the mask and its output."""

    def __init__(self, seed):
        super().__init__()
        self.u = nn.Parameter(torch.randn(C, generator=torch.Generator().manual_seed(seed)))
        self.masks, self.outputs = [], []

    def forward(self, tokens, abnormal=None):
        self.masks.append(abnormal)
        out = _fill_patches(tokens @ self.u)
        self.outputs.append(out.detach())
        return out


def _stub_method(**overrides):
    """An Afire whose student and teacher are stubs with different weights (so a swap shows)."""
    method = build_afire(**{**STUB, **overrides})
    method.student.backbone, method.student.head = StubBackbone(1), StubHead(2)
    method.student.decoder = StubDecoder(3)
    method.teacher = make_teacher(nn.ModuleDict({"backbone": StubBackbone(11), "head": StubHead(12)}))
    return method.train()


def _stub_batch(seed, b=2):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(b, 1, 32, 32, 32, generator=g)
    abnormal = torch.zeros(b, N, dtype=torch.bool)
    abnormal[0, [1, 6]] = True
    abnormal[1, 3] = True
    lesion_map = _fill_patches(abnormal.float())
    # The lesioned volume is the clean one + 1: a restoration target of the lesioned input is off by 1.
    return {"image": image, "image_lesioned": image + 1, "image_lesion_map": lesion_map, "image_abnormal": abnormal}


def plain_sinkhorn(scores, epsilon=0.05, iterations=3):
    """Sinkhorn-Knopp written out as the official AFiRe loop: prototypes first, then positions."""
    q = torch.exp(scores.double() / epsilon).T  # (K, N)
    q = q / q.sum()
    k, n = q.shape
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True) / k  # every prototype gets mass 1 / K
        q = q / q.sum(dim=0, keepdim=True) / n  # every position gets mass 1 / N
    return (q * n).T.float()


def _hand_cate(student_scores, targets, normal):
    log_p = torch.log_softmax(student_scores / 0.1, dim=-1)
    per_token = -(targets[None] * log_p).sum(-1)
    return per_token[normal].sum() / normal.sum()


def _hand_stru(q, centres, normal):
    c = centres / centres.norm(dim=-1, keepdim=True)
    logits = q @ c.T / 0.1  # (B, N, N)
    per_token = -torch.log_softmax(logits, dim=-1).diagonal(dim1=1, dim2=2)
    return per_token[normal].sum() / normal.sum()


def test_stub_inputs_targets_and_every_loss_part_by_hand():
    method = _stub_method()
    first, second = _stub_batch(0), _stub_batch(1)
    method(first, STEP)
    out = method(second, StepInfo(step=1, total_steps=2, epoch=0))
    student, teacher = method.student, method.teacher
    # Who saw what: the student the lesioned volumes, the teacher the clean ones, exactly.
    batches = (first, second)
    assert all(torch.equal(x, b["image_lesioned"]) for x, b in zip(student.backbone.inputs, batches, strict=True))
    assert all(torch.equal(x, b["image"]) for x, b in zip(teacher["backbone"].inputs, batches, strict=True))
    # The decoder masks exactly the abnormal tokens.
    assert all(torch.equal(m, b["image_abnormal"]) for m, b in zip(student.decoder.masks, batches, strict=True))

    (t1_scores, t1_z), (t2_scores, t2_z) = teacher["head"].outputs
    s_scores, s_z = student.head.outputs[-1]
    # Prototypes: the first step sets C to the teacher's batch mean, then EMA 0.75; centres likewise with 0.9.
    protos = 0.75 * t1_scores.mean(0) + 0.25 * t2_scores.mean(0)
    centres = 0.9 * t1_z.mean(0) + 0.1 * t2_z.mean(0)
    torch.testing.assert_close(method.prototypes, protos)
    torch.testing.assert_close(method.centres, centres)

    normal = ~second["image_abnormal"]
    targets = plain_sinkhorn(protos)
    cate = _hand_cate(s_scores, targets, normal)
    torch.testing.assert_close(out["parts"]["cate"], cate)
    # The Sinkhorn balancing matters here: a plain softmax of C gives another value.
    softmaxed = _hand_cate(s_scores, torch.softmax(protos / 0.05, dim=-1), normal)
    assert abs(float(softmaxed - cate)) > 1e-2

    stru = _hand_stru(s_z, centres, normal)
    torch.testing.assert_close(out["parts"]["stru"], stru)
    # The centres are the teacher's: the student's own mean features give another value.
    assert abs(float(_hand_stru(s_z, s_z.mean(0), normal) - stru)) > 1e-2

    recon = student.decoder.outputs[-1]
    rec = ((recon - second["image"]) ** 2).mean()
    torch.testing.assert_close(out["parts"]["rec"], rec)
    assert abs(float(((recon - second["image_lesioned"]) ** 2).mean() - rec)) > 0.5
    torch.testing.assert_close(out["loss"], cate + stru + rec)
    assert out["parts"]["abnormal_fraction"] == 3 / 16


def test_contrastive_terms_count_normal_tokens_only_and_the_structural_switch():
    batch = _stub_batch(2)
    ones = torch.ones_like(batch["image_abnormal"])
    method = _stub_method(structural=False, restoration_weight=2.0)
    out = method(batch, STEP)
    s_scores, s_z = method.student.head.outputs[-1]
    t_scores, _ = method.teacher["head"].outputs[-1]
    cate = _hand_cate(s_scores, plain_sinkhorn(t_scores.mean(0)), ~batch["image_abnormal"])
    torch.testing.assert_close(out["parts"]["cate"], cate)
    everywhere = _hand_cate(s_scores, plain_sinkhorn(t_scores.mean(0)), ones)
    assert abs(float(everywhere - cate)) > 1e-3  # the lesion tokens would change the value
    assert out["parts"]["stru"] == 0 and float(method.centres.abs().sum()) == 0  # off: no centres either
    torch.testing.assert_close(out["loss"], cate + 2.0 * out["parts"]["rec"])


def test_micro_batches_of_one_step_pool_into_the_emas():
    first, second = _stub_batch(3, b=4), _stub_batch(4, b=4)
    whole, split = _stub_method(), _stub_method()
    for method in (whole, split):
        method(first, STEP)
    whole(second, StepInfo(step=1, total_steps=2, epoch=0))
    for i, rows in enumerate((slice(0, 2), slice(2, 4))):
        half = {k: v[rows] for k, v in second.items()}
        split(half, StepInfo(step=1, total_steps=2, epoch=0, micro_batch=i))
    torch.testing.assert_close(split.prototypes, whole.prototypes)
    torch.testing.assert_close(split.centres, whole.centres)
    # Not two EMA steps: that would weigh the step's first half by 0.75 * 0.25.
    t1, _ = whole.teacher["head"].outputs[0]
    t2, _ = whole.teacher["head"].outputs[1]
    torch.testing.assert_close(whole.prototypes, 0.75 * t1.mean(0) + 0.25 * t2.mean(0))


def test_the_emas_are_checkpointed_and_resume():
    method = _stub_method()
    assert not bool(method.prototype_ema.ready) and not bool(method.centre_ema.ready)
    method(_stub_batch(5), STEP)
    kept = method.prototypes.clone(), method.centres.clone()
    with torch.no_grad():
        method.eval()(_stub_batch(7), STEP)  # evaluation never moves them
    method.train()
    assert torch.equal(method.prototypes, kept[0]) and torch.equal(method.centres, kept[1])
    state = method.state_dict()
    assert {"prototype_ema.value", "prototype_ema.ready", "centre_ema.value", "centre_ema.ready"} <= set(state)
    fresh = _stub_method()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.prototypes, method.prototypes) and torch.equal(fresh.centres, method.centres)
    nxt = _stub_batch(6)
    method(nxt, StepInfo(step=1, total_steps=2, epoch=0))
    fresh(nxt, StepInfo(step=1, total_steps=2, epoch=0))
    assert torch.equal(fresh.prototypes, method.prototypes) and torch.equal(fresh.centres, method.centres)


class MaskEchoDecoder(nn.Module):
    """Fills patch j with j + 1 where token j is masked, with -1 elsewhere."""

    def forward(self, tokens, abnormal):
        return _fill_patches(torch.where(abnormal, torch.arange(1.0, N + 1), torch.tensor(-1.0)))


def test_parity_groups_split_the_grid_so_that_no_face_neighbours_share_a_group():
    for grid, count in (((2, 2, 2), 8), ((4, 3, 2), 8), ((1, 2, 2), 4)):
        groups = parity_groups(grid)
        assert groups.shape == (count, int(np.prod(grid))) and torch.equal(groups.sum(0), torch.ones(groups.shape[1]))
        for group in groups:
            cells = group.reshape(grid)
            for axis in range(3):
                pairs = cells.narrow(axis, 0, grid[axis] - 1) & cells.narrow(axis, 1, grid[axis] - 1)
                assert not bool(pairs.any())


def test_anomaly_restoration_takes_each_patch_from_the_pass_that_masked_it():
    method = _stub_method()
    with pytest.raises(RuntimeError, match="trained"):
        method.anomaly_maps(torch.rand(1, 1, 32, 32, 32))
    method(_stub_batch(8), STEP)
    method.student.decoder = MaskEchoDecoder()
    maps = method.eval().anomaly_maps(torch.rand(2, 1, 32, 32, 32))
    assert torch.equal(maps["restoration"], _fill_patches(torch.arange(1.0, N + 1).expand(2, -1)))
    teacher_scores, _ = method.teacher["head"].outputs[-1]
    distance = 1 - (teacher_scores * method.prototypes).sum(-1) / (
        teacher_scores.norm(dim=-1) * method.prototypes.norm(dim=-1)
    )
    torch.testing.assert_close(maps["token_distance"], distance)


def test_transforms_give_the_batch_the_method_reads():
    batch = _batch((0, 1))
    assert set(batch) == {"image", "image_lesioned", "image_lesion_map", "image_abnormal"}
    assert batch["image"].shape == batch["image_lesioned"].shape == (2, 1, 64, 64, 64)
    assert batch["image_abnormal"].shape == (2, 64) and batch["image_abnormal"].dtype == torch.bool
    assert bool(batch["image_abnormal"].any())


def test_forward_returns_finite_weighted_parts(method):
    batch = _batch()
    method.train()
    out = method(batch, STEP)
    parts = out["parts"]
    assert set(parts) == {"cate", "stru", "rec", "abnormal_fraction"}
    assert torch.isfinite(out["loss"]) and out["loss"].ndim == 0
    torch.testing.assert_close(out["loss"], parts["cate"] + parts["stru"] + parts["rec"])
    # Untrained: the categorical CE is near log K at most a few nats above, InfoNCE near log N.
    assert 0 < parts["cate"] < 3 * np.log(16) and 0 < parts["stru"] < 3 * np.log(64)
    weighted = Afire(AfireConfig(**TINY, structural=False, restoration_weight=2.0))
    weighted.load_state_dict(method.state_dict())
    with torch.no_grad():
        out2 = weighted(batch, STEP)
    assert out2["parts"]["stru"] == 0
    torch.testing.assert_close(out2["loss"], out2["parts"]["cate"] + 2.0 * out2["parts"]["rec"])


def test_lesion_tokens_contribute_nothing_to_the_contrastive_terms():
    torch.manual_seed(2)
    b, n, k, d = 2, 64, 16, 32
    scores = torch.randn(b, n, k, requires_grad=True)
    q = torch.nn.functional.normalize(torch.randn(b, n, d), dim=-1).requires_grad_(True)
    targets = torch.softmax(torch.randn(n, k), dim=-1)
    centres = torch.nn.functional.normalize(torch.randn(n, d), dim=-1)
    abnormal = torch.rand(b, n) < 0.3
    normal = ~abnormal
    cate, stru = CategoricalLoss(), StructuralLoss()
    (cate(scores, targets, normal) + stru(q, centres, normal)).backward()
    assert float(scores.grad[abnormal].abs().max()) == 0 and float(q.grad[abnormal].abs().max()) == 0
    assert float(scores.grad[normal].abs().max()) > 0
    noise = abnormal[..., None]
    perturbed_s = torch.where(noise, torch.randn(b, n, k) * 100, scores.detach())
    perturbed_q = torch.where(noise, torch.randn(b, n, d), q.detach())
    torch.testing.assert_close(cate(perturbed_s, targets, normal), cate(scores, targets, normal))
    torch.testing.assert_close(stru(perturbed_q, centres, normal), stru(q, centres, normal))
    assert cate(perturbed_s, targets, normal) != cate(perturbed_s, targets, torch.ones_like(normal))


def test_all_tokens_abnormal_leaves_only_restoration(method):
    batch = _batch()
    batch["image_abnormal"] = torch.ones_like(batch["image_abnormal"])
    with torch.no_grad():
        out = method(batch, STEP)
    assert out["parts"]["cate"] == 0 and out["parts"]["stru"] == 0
    torch.testing.assert_close(out["loss"], out["parts"]["rec"])


def test_backward_reaches_student_not_teacher(method):
    method.train().zero_grad()
    method(_batch(), STEP)["loss"].backward()
    for name in ("backbone", "head", "decoder"):
        grads = [p.grad for p in getattr(method.student, name).parameters() if p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads), name
        assert sum(float(g.abs().sum()) for g in grads) > 0, name
    assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())
    pairs = method.momentum_pairs()
    assert [s for s, _ in pairs] == [method.student.backbone, method.student.head]
    method.zero_grad()


def test_export_loads_fully_into_monai_unetr(method):
    vit = BACKBONE_SIZES["vit"]["tiny"]
    net = UNETR(
        in_channels=1,
        out_channels=2,
        img_size=(64, 64, 64),
        hidden_size=vit.hidden_size,
        mlp_dim=vit.mlp_dim,
        num_heads=vit.num_heads,
    )
    report = load_pretrained(net, method.export_state_dict("unetr"))
    assert report.encoder_matched == report.encoder_total > 0


def test_config_travels_in_the_state_dict(method):
    state = method.state_dict()
    assert config_from_checkpoint(state) == method.config
    assert config_from_checkpoint(state, structural=False).structural is False
    with pytest.raises(ValueError, match="no AFiRe config"):
        config_from_checkpoint({})


def test_presets_mirror_the_dataclass():
    assert config_from_yaml(PRESETS, preset="base") == AfireConfig()
    assert AfireConfig().num_tokens == 216
    assert config_from_yaml(PRESETS, preset="large") == AfireConfig(img_size=(128, 128, 128))
    assert config_from_yaml(PRESETS, preset="tiny", num_prototypes=16) == AfireConfig(**TINY)
    assert config_from_yaml(PRESETS, preset="code") == AfireConfig(structural=False)
    with pytest.raises(ValueError, match="huge"):
        config_from_yaml(PRESETS, preset="huge")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"bogus": 1},
        {"img_size": 40},
        {"prototype_momentum": 1.0},
        {"centre_momentum": -0.1},
        {"sinkhorn_epsilon": 0.0},
        {"lesion_weight": -1},
    ],
)
def test_bad_config_raises(kwargs):
    with pytest.raises(ValueError):
        build_afire(**{**TINY, **kwargs})
