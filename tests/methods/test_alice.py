import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor, list_data_collate
from monai.networks.nets import SwinUNETR

from medssl3d.data.phantoms import make_phantom
from medssl3d.engine.checkpoint import load_checkpoint
from medssl3d.engine.ema import ema_update
from medssl3d.engine.trainer import Pretrainer
from medssl3d.methods.alice import AliceConfig, alice_transforms, build_alice, config_from_yaml
from medssl3d.methods.base import StepInfo
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
    assert (original.recon_weight, original.teacher_temp, original.teacher_temp_final) == (10.0, 0.008, 0.01)
    assert original.casa_variant == "code" and original.mask_mode == "column"
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


def test_code_variant_gradients_reach_the_student_and_never_the_teacher(sample):
    torch.manual_seed(0)
    provider = FeatureProvider(warmup_steps=0)
    method = build_alice(provider=provider, casa_variant="code", **SMALL)
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
