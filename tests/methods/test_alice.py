import copy
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.data import MetaTensor, list_data_collate
from monai.networks.nets import SwinUNETR
from torch import nn

from medssl3d.data.phantoms import make_phantom
from medssl3d.engine.checkpoint import load_checkpoint
from medssl3d.engine.ema import ema_update
from medssl3d.engine.trainer import Pretrainer
from medssl3d.methods.alice import AliceConfig, alice_transforms, build_alice, config_from_yaml, prototype_logits
from medssl3d.methods.base import StepInfo
from medssl3d.networks.backbones import BackboneOutput
from medssl3d.transforms.feature_match import FeatureProvider
from medssl3d.transforms.paired_crops import build_provider

pytestmark = pytest.mark.usefixtures("one_thread")

PRESETS = Path(__file__).resolve().parents[2] / "configs" / "methods" / "alice.yaml"
ROI = (64, 32, 32)  # the smallest crop SwinUNETR's bottleneck instance norm accepts (2 x 1 x 1)
# tiny Swin and narrow heads (K = 64) keep a step to a few seconds on a CPU core
SMALL = dict(backbone_size="tiny", roi_size=ROI, proj_dim=64, head_hidden_dim=64, head_bottleneck_dim=32,
             out_dim=64, casa_ffn_dim=128)
STEP = StepInfo(step=0, total_steps=10, epoch=0)
RUN_STEPS = 5


def _volume(seed):
    phantom = make_phantom(shape=(72, 40, 40), seed=seed)
    array = np.clip((phantom.image + 125.0) / 350.0, 0.0, 1.0).astype(np.float32)
    return MetaTensor(torch.from_numpy(array)[None], affine=torch.as_tensor(phantom.affine))


@pytest.fixture(scope="module")
def sample():
    views = alice_transforms(build_provider("body_box", roi_size=ROI), roi_size=ROI)
    views.set_random_state(seed=0)
    return views({"image": _volume(0), "image_k": _volume(1)})


@pytest.fixture(scope="module")
def tiny_run(sample, tmp_path_factory):
    """Five optimizer steps of the engine on one fixed pair of phantom crops."""
    out_dir = tmp_path_factory.mktemp("alice_run")
    torch.manual_seed(0)
    method = build_alice(**SMALL)
    trainer = Pretrainer(method, [sample], max_steps=RUN_STEPS, batch_size=1, lr=1e-3, warmup_steps=0,
                         out_dir=str(out_dir), tensorboard=False, log_every=1)
    trainer.run()
    return method, out_dir


def test_presets_mirror_the_dataclass_and_name_the_original_settings():
    assert config_from_yaml(PRESETS, "base") == AliceConfig()
    original = config_from_yaml(PRESETS, "original")
    # the official code: loss.py MSE over all voxels / 2 * lambda3 (10); CASA on the head's logits, shared
    assert (original.recon_weight, original.recon_masked_only) == (5.0, False)
    assert (original.teacher_temp, original.teacher_temp_final) == (0.008, 0.01)
    assert (original.casa_variant, original.casa_input, original.mask_mode) == ("code", "logits", "column")
    assert original.roi_size == (64, 64, 64)
    tiny = config_from_yaml(PRESETS, "tiny", max_tries=5)
    assert tiny.backbone_size == "tiny" and tiny.roi_size == (64, 64, 64) and tiny.max_tries == 5
    defaults = AliceConfig()
    assert (defaults.match_threshold, defaults.max_tries, defaults.mask_ratio, defaults.mask_block_size) == (
        0.7, 100, 0.75, 16)
    assert (defaults.student_temp, defaults.teacher_temp, defaults.teacher_temp_final) == (0.1, 0.04, 0.07)
    with pytest.raises(ValueError, match="unknown AliceConfig"):
        build_alice(lambda3=10)
    with pytest.raises(ValueError, match="casa_variant"):
        AliceConfig(casa_variant="both")
    with pytest.raises(ValueError, match="casa_input.*'features'"):
        AliceConfig(casa_input="features")
    with pytest.raises(ValueError, match="recon_masked_only.*'false'"):
        AliceConfig(recon_masked_only="false")  # a command line's "false" is a string


def test_transforms_give_the_batch_the_method_reads(sample):
    for v in ("view_q", "view_k"):
        assert sample[v].shape == sample[f"{v}_masked"].shape == sample[f"{v}_mask"].shape == (1, *ROI)
        mask = sample[f"{v}_mask"].bool()
        assert (sample[f"{v}_masked"][mask] == 0).all() and mask.float().mean() == 0.75
    assert "image" not in sample and "image_k" not in sample
    assert 0.0 <= float(sample["pair_score"]) <= 1.0 and 1 <= int(sample["pair_tries"]) <= 100


def _assert_gradients_reach_the_student_and_never_the_teacher(method):
    s = method.student
    for name in ("backbone", "recon", "enc_proj", "dec_proj", "head", "patch_last_layer", "casa"):
        grads = [p.grad for p in getattr(s, name).parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0, name
    assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())


@pytest.mark.parametrize("casa_input", ["tokens", "logits"])
def test_code_variant_gradients_reach_the_student_and_never_the_teacher(sample, casa_input):
    torch.manual_seed(0)
    provider = FeatureProvider(warmup_steps=0)
    method = build_alice(provider=provider, casa_variant="code", casa_input=casa_input, **SMALL)
    assert "casa" not in method.teacher  # CASA' is the student's CASA
    out = method(list_data_collate([sample]), STEP)
    parts = out["parts"]
    assert {"inter", "intra", "recon", "pair_accept", "pair_score"} <= set(parts)
    torch.testing.assert_close(out["loss"], parts["inter"] + parts["intra"] + parts["recon"])
    out["loss"].backward()
    _assert_gradients_reach_the_student_and_never_the_teacher(method)
    # the feature provider got its teacher snapshot in the training step (warm-up 0)
    assert provider.active


def test_paper_variant_gradients_reach_the_student_and_never_the_teacher(tiny_run):
    method, _ = tiny_run  # the engine leaves the last step's gradients in place
    assert "casa" in method.teacher
    _assert_gradients_reach_the_student_and_never_the_teacher(method)


def test_paper_variant_ema_copy_of_casa_moves_with_the_schedule():
    torch.manual_seed(0)
    method = build_alice(**SMALL)
    pairs = dict((id(t), s) for s, t in method.momentum_pairs())
    assert id(method.teacher["casa"]) in pairs and pairs[id(method.teacher["casa"])] is method.student.casa
    with torch.no_grad():
        for p in method.student.casa.parameters():
            p.add_(1.0)
    before = [p.clone() for p in method.teacher["casa"].parameters()]
    for student, teacher in method.momentum_pairs():
        ema_update(student, teacher, 0.9)
    for old, new, s in zip(before, method.teacher["casa"].parameters(), method.student.casa.parameters(),
                           strict=True):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * s)


def test_teacher_temperature_warms_up_over_epochs():
    method = build_alice(**SMALL)
    temps = [method.teacher_temperature(StepInfo(step=0, total_steps=1, epoch=e)) for e in (0, 15, 30, 40)]
    np.testing.assert_allclose(temps, [0.04, 0.055, 0.07, 0.07])


def test_tiny_run_lowers_each_loss_part(tiny_run):
    _, out_dir = tiny_run
    metrics = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == RUN_STEPS
    for part in ("inter", "intra", "recon"):
        assert metrics[-1][part] < metrics[0][part], (part, [m[part] for m in metrics])
    assert all(m["pair_accept"] in (0.0, 1.0) for m in metrics)


def test_checkpoints_contain_casa_and_resume_it(tiny_run, sample):
    method, out_dir = tiny_run
    ckpt = load_checkpoint(out_dir / "checkpoints" / "last.pt")
    assert ckpt["method"] == "alice"
    for prefix in ("student.casa.", "teacher.casa."):
        assert any(k.startswith(prefix) for k in ckpt["model"])
    fresh = build_alice(**SMALL)
    Pretrainer(fresh, [sample], max_steps=RUN_STEPS, batch_size=1, out_dir=str(out_dir), tensorboard=False).run()
    for a, b in ((fresh.student.casa, method.student.casa), (fresh.teacher["casa"], method.teacher["casa"])):
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(p, q), name
    torch.testing.assert_close(fresh.patch_loss.center, method.patch_loss.center)


def test_export_fills_encoder_and_decoder_of_swinunetr(tiny_run):
    method, _ = tiny_run
    weights = method.export_state_dict("swinunetr")
    net = SwinUNETR(in_channels=1, out_channels=2, feature_size=12)
    expected = {k: v.shape for k, v in net.state_dict().items() if not k.startswith("out.")}
    assert {k: v.shape for k, v in weights.items()} == expected
    assert any(k.startswith("decoder1.") for k in weights) and any(k.startswith("swinViT.") for k in weights)
    missing, unexpected = net.load_state_dict(weights, strict=False)
    assert unexpected == [] and all(k.startswith("out.") for k in missing)


def test_config_replace_keeps_validation():
    with pytest.raises(ValueError, match="mask_ratio"):
        replace(AliceConfig(), mask_ratio=1.5)


# ---------------------------------------------------------------------------------------------
# Known answers with a stub backbone: every loss part recomputed by hand from recorded tensors.

STUB_ROI = (64, 64, 32)  # 2 x 2 x 1 bottleneck tokens, 4 x 4 x 2 first-decoder-stage tokens
STUB_BATCH = 2
STUB_STEP = StepInfo(step=3, total_steps=10, epoch=12, micro_batch=0)
STUB_TAU = 0.04 + (0.07 - 0.04) * 12 / 30  # tau_t at epoch 12 of the 30-epoch warm-up
WEIGHTS = dict(inter_weight=0.5, intra_weight=2.0, recon_weight=3.0)


class RecordingBackbone(nn.Module):
    """A SwinBackbone stand-in with tiny Swin's widths: small convolutions of its input, every input recorded.

    ``forward`` gives the bottleneck tokens (stride 32); ``decode_stages`` gives the first decoder stage
    (stride 16, 8 f channels) and, when more stages are asked for, a full-resolution last stage (f channels)
    (the method reads only the first and the last).
    """

    feature_size, embed_dim, feature_channels = 12, 192, (12, 24, 48, 96, 192)

    def __init__(self):
        super().__init__()
        self.encode = nn.Conv3d(1, self.embed_dim, kernel_size=32, stride=32)
        self.first = nn.Conv3d(1, self.feature_channels[3], kernel_size=16, stride=16)
        self.last = nn.Conv3d(1, self.feature_size, kernel_size=3, padding=1)
        self.encoded, self.decoded = [], []

    def forward(self, x):
        self.encoded.append(x.detach().clone())
        fmap = self.encode(x)
        return BackboneOutput(tokens=fmap.flatten(2).transpose(1, 2), features=[fmap], strides=(32,))

    def decode_stages(self, x, out, num_stages=5):
        self.decoded.append(x.detach().clone())
        return [self.first(x)] if num_stages == 1 else [self.first(x), self.last(x)]


def _record_outputs(module, store):
    module.register_forward_hook(lambda m, args, out: store.append(out.detach().clone()))


def _record_calls(module, store):
    module.register_forward_hook(lambda m, args, out: store.append((*(a.detach().clone() for a in args), out.detach())))


def _stub_method(**overrides):
    """Alice with stub backbones, no CASA dropout, a teacher that differs from the student, non-zero centres."""
    torch.manual_seed(0)
    method = build_alice(**{**SMALL, "roi_size": STUB_ROI, "casa_dropout": 0.0, **WEIGHTS, **overrides})
    method.student.backbone = RecordingBackbone()
    method.teacher["backbone"] = copy.deepcopy(method.student.backbone).requires_grad_(False)
    with torch.no_grad():
        for p in method.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for loss in (method.cls_loss, method.patch_loss):
            loss.center.copy_(0.3 * torch.randn_like(loss.center))
    rec = {name: [] for name in ("s_enc", "s_dec", "t_enc", "t_dec", "recon", "s_casa", "t_casa")}
    s, t = method.student, method.teacher
    for module, name in ((s.enc_proj, "s_enc"), (s.dec_proj, "s_dec"), (t["enc_proj"], "t_enc"),
                         (t["dec_proj"], "t_dec"), (s.recon, "recon")):
        _record_outputs(module, rec[name])
    _record_calls(s.casa, rec["s_casa"])
    if "casa" in t:
        _record_calls(t["casa"], rec["t_casa"])
    return method, rec


def _stub_batch():
    g = torch.Generator().manual_seed(1)
    batch = {}
    for v in ("view_q", "view_k"):
        clean = torch.rand(STUB_BATCH, 1, *STUB_ROI, generator=g)
        blocks = (torch.rand(STUB_BATCH, 1, 4, 4, 2, generator=g) < 0.75).float()
        mask = blocks.repeat_interleave(16, 2).repeat_interleave(16, 3).repeat_interleave(16, 4)
        batch[v], batch[f"{v}_mask"], batch[f"{v}_masked"] = clean, mask, clean * (1 - mask)
    return batch


def _scores(mlp, prototypes, x):
    return F.normalize(mlp(x), dim=-1, eps=1e-6) @ F.normalize(prototypes, dim=1).T


def _cross_entropy(teacher, student, center, tau):
    return -(torch.softmax((teacher - center) / tau, dim=-1) * torch.log_softmax(student / 0.1, dim=-1)).sum(-1).mean()


def test_student_gets_the_masked_crops_and_the_teacher_the_clean_ones():
    method, _ = _stub_method(casa_variant="code")
    batch = _stub_batch()
    method(batch, STUB_STEP)
    masked = torch.cat([batch["view_q_masked"], batch["view_k_masked"]])
    clean = torch.cat([batch["view_q"], batch["view_k"]])
    student, teacher = method.student.backbone, method.teacher["backbone"]
    assert len(student.encoded) == len(student.decoded) == 1
    assert torch.equal(student.encoded[0], masked) and torch.equal(student.decoded[0], masked)
    assert len(teacher.encoded) == len(teacher.decoded) == 1  # the code variant decodes the teacher's crops
    assert torch.equal(teacher.encoded[0], clean) and torch.equal(teacher.decoded[0], clean)


def test_inter_is_the_crossed_cls_cross_entropy_at_the_scheduled_temperature():
    method, rec = _stub_method()
    center = method.cls_loss.center.clone()
    out = method(_stub_batch(), STUB_STEP)
    s, t = method.student, method.teacher
    s_cls = _scores(s.head.mlp, s.head.last_layer.weight, rec["s_enc"][0].mean(1)).chunk(2)
    t_cls = _scores(t["head"].mlp, t["head"].last_layer.weight, rec["t_enc"][0].mean(1)).chunk(2)
    # teacher Q against student K, teacher K against student Q
    q_to_k = _cross_entropy(t_cls[0], s_cls[1], center, STUB_TAU)
    k_to_q = _cross_entropy(t_cls[1], s_cls[0], center, STUB_TAU)
    inter = (q_to_k + k_to_q) / 2
    torch.testing.assert_close(out["parts"]["inter"], inter.detach())
    torch.testing.assert_close(out["parts"]["teacher_temp"], torch.tensor(STUB_TAU))
    # the centre moved once, over the teacher rows of both views
    torch.testing.assert_close(method.cls_loss.center, 0.9 * center + 0.1 * torch.cat(t_cls).mean(0, keepdim=True))


def test_centres_and_the_teacher_snapshot_move_on_the_first_micro_batch_of_a_step_only():
    method, _ = _stub_method()
    method.provider = FeatureProvider(warmup_steps=0)
    centres = [loss.center.clone() for loss in (method.cls_loss, method.patch_loss)]
    method(_stub_batch(), replace(STUB_STEP, micro_batch=1))
    for loss, before in zip((method.cls_loss, method.patch_loss), centres, strict=True):
        torch.testing.assert_close(loss.center, before)
    assert not method.provider.active
    method(_stub_batch(), STUB_STEP)
    for loss, before in zip((method.cls_loss, method.patch_loss), centres, strict=True):
        assert not torch.allclose(loss.center, before)
    assert method.provider.active and method.provider.snapshot_step == STUB_STEP.step


def _expected_intra(method, rec, center):
    """L2 by hand: S_v and T_v from the recorded CASA calls, after checking what each call received."""
    cfg, s, t = method.config, method.student, method.teacher
    on_logits = cfg.casa_input == "logits"
    t_context = rec["t_enc"][0] if cfg.casa_variant == "paper" else rec["t_dec"][0]
    if on_logits:
        query = _scores(s.head.mlp, s.patch_last_layer.weight, rec["s_enc"][0])
        s_context = _scores(s.head.mlp, s.patch_last_layer.weight, rec["s_dec"][0])
        t_context = _scores(t["head"].mlp, t["head"].last_layer.weight, t_context)
    else:
        query, s_context = rec["s_enc"][0], rec["s_dec"][0]
    # paper: CASA' is the teacher's EMA copy; code: the student's CASA, called a second time
    s_call = rec["s_casa"][0]
    t_calls = rec["t_casa"] if cfg.casa_variant == "paper" else rec["s_casa"][1:]
    assert len(rec["s_casa"]) == (1 if cfg.casa_variant == "paper" else 2) and len(t_calls) == 1
    t_call = t_calls[0]
    for got, want in zip(s_call[:2] + t_call[:2], (query, s_context, query, t_context), strict=True):
        torch.testing.assert_close(got, want)
    if on_logits:
        student_patch, teacher_patch = s_call[2], t_call[2]
    else:
        student_patch = _scores(s.head.mlp, s.patch_last_layer.weight, s_call[2])
        teacher_patch = _scores(t["head"].mlp, t["head"].last_layer.weight, t_call[2])
    pairs = zip(teacher_patch.chunk(2), student_patch.chunk(2), strict=True)  # T_v against S_v, same view
    return sum(_cross_entropy(tv, sv, center, STUB_TAU) for tv, sv in pairs) / 2


@pytest.mark.parametrize("variant", ["paper", "code"])
@pytest.mark.parametrize("casa_input", ["tokens", "logits"])
def test_intra_is_the_casa_token_cross_entropy_of_each_view(variant, casa_input):
    method, rec = _stub_method(casa_variant=variant, casa_input=casa_input)
    center = method.patch_loss.center.clone()
    out = method(_stub_batch(), STUB_STEP)
    torch.testing.assert_close(out["parts"]["intra"], _expected_intra(method, rec, center).detach())


@pytest.mark.parametrize("masked_only", [True, False])
def test_recon_is_the_mse_to_the_clean_crops_over_the_configured_voxels(masked_only):
    method, rec = _stub_method(recon_masked_only=masked_only)
    batch = _stub_batch()
    out = method(batch, STUB_STEP)
    clean = torch.cat([batch["view_q"], batch["view_k"]])
    mask = torch.cat([batch["view_q_mask"], batch["view_k_mask"]])
    err = (rec["recon"][0] - clean) ** 2
    recon = (err * mask).sum() / mask.sum() if masked_only else err.mean()
    torch.testing.assert_close(out["parts"]["recon"], recon)
    parts = out["parts"]
    total = 0.5 * parts["inter"] + 2.0 * parts["intra"] + 3.0 * parts["recon"]
    torch.testing.assert_close(out["loss"].detach(), total)


def test_prototype_logits_run_in_float32_under_autocast():
    torch.manual_seed(0)
    mlp, prototypes, x = nn.Sequential(nn.Linear(16, 8)), torch.randn(32, 8), torch.randn(5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = prototype_logits(mlp, prototypes, x)
        z = mlp(x)
    assert z.dtype == torch.bfloat16 and logits.dtype == torch.float32
    want = F.normalize(z.float(), dim=-1, eps=1e-6) @ F.normalize(prototypes, dim=1).T
    torch.testing.assert_close(logits, want, rtol=0, atol=1e-6)
