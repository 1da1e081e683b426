from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor, list_data_collate
from monai.networks.nets import UNETR

from medssl3d.data.phantoms import make_phantom
from medssl3d.losses.afire import CategoricalLoss, StructuralLoss
from medssl3d.methods.afire import (
    Afire,
    AfireConfig,
    afire_transforms,
    build_afire,
    config_from_checkpoint,
    config_from_yaml,
)
from medssl3d.methods.base import StepInfo
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


def test_prototypes_start_at_the_batch_mean_then_follow_an_ema():
    torch.manual_seed(1)
    m = build_afire(**TINY).train()
    b1, b2 = _batch((2,)), _batch((3,))
    assert not bool(m.prototypes_ready)
    with torch.no_grad():
        m(b1, STEP)
        first, _ = m._teacher(b1["image"])
        torch.testing.assert_close(m.prototypes, first.mean(0))
        m(b2, STEP)
        second, _ = m._teacher(b2["image"])
        torch.testing.assert_close(m.prototypes, 0.75 * first.mean(0) + 0.25 * second.mean(0))
        kept = m.prototypes.clone()
        m.eval()(b2, STEP)  # evaluation never moves the prototypes
    assert torch.equal(m.prototypes, kept) and bool(m.prototypes_ready)


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
    with pytest.raises(ValueError, match="huge"):
        config_from_yaml(PRESETS, preset="huge")


@pytest.mark.parametrize(
    "kwargs",
    [{"bogus": 1}, {"img_size": 40}, {"prototype_momentum": 1.0}, {"sinkhorn_epsilon": 0.0}, {"lesion_weight": -1}],
)
def test_bad_config_raises(kwargs):
    with pytest.raises(ValueError):
        build_afire(**{**TINY, **kwargs})
