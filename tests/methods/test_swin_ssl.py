import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.data import Dataset, list_data_collate
from monai.networks.nets import SwinUNETR
from monai.utils import MAX_SEED
from torch import nn

from medssl3d.data.phantoms import make_phantom
from medssl3d.methods.base import StepInfo
from medssl3d.methods.swin_ssl import (
    SwinSSL,
    SwinSSLConfig,
    build_swin_ssl,
    config_from_yaml,
    swin_ssl_transforms,
)
from medssl3d.networks.backbones import BackboneOutput
from medssl3d.transforms.cutout import CutoutBoxes

pytestmark = pytest.mark.usefixtures("one_thread")

PRESETS = Path(__file__).resolve().parents[2] / "configs" / "methods" / "swin_ssl.yaml"
SMALL_ROI = (64, 32, 32)  # the smallest crop giving the two bottleneck tokens the heads read
STEP = StepInfo(step=0, total_steps=1, epoch=0)
VIEWS = ("view1", "view2")
PLANE = (2, 3)  # tensor dims of the A and S axes of a (C, R, A, S) sample: the sagittal plane


def _phantom(shape, seed=0):
    return torch.from_numpy(make_phantom(shape=shape, seed=seed).windowed())[None]


def _batch(roi, batch_size, seed=0):
    t = swin_ssl_transforms(roi)
    t.set_random_state(seed=seed)
    volume = _phantom(tuple(s + 8 for s in roi), seed)
    return list_data_collate([t({"image": volume}) for _ in range(batch_size)])


@pytest.fixture(scope="module")
def method():
    torch.manual_seed(0)
    return build_swin_ssl(backbone_size="tiny")


def test_transforms_give_the_batch_the_method_reads():
    transform = swin_ssl_transforms((32, 32, 32))
    transform.set_random_state(seed=0)
    sample = transform({"image": _phantom((40, 40, 48))})
    assert set(sample) == {f"view{i}{s}" for i in (1, 2) for s in ("", "_cutout", "_rot", "_cutout_fraction")}
    for v in ("view1", "view2"):
        assert sample[v].shape == sample[f"{v}_cutout"].shape == (1, 32, 32, 32)
        assert 0 < float(sample[f"{v}_cutout_fraction"]) <= 0.3
        assert int(sample[f"{v}_rot"]) in range(4)
        changed = (sample[v] != sample[f"{v}_cutout"]).float().mean()
        # noise can redraw a voxel's own value, so a few cut voxels may look unchanged; none outside may change
        fraction = float(sample[f"{v}_cutout_fraction"])
        assert fraction - 1e-3 <= float(changed) <= fraction


def test_forward_at_64_returns_finite_loss_and_parts(method):
    batch = _batch((64, 64, 64), batch_size=1)
    with torch.no_grad():
        out = method(batch, STEP)
    assert set(out["parts"]) == {"rot", "contrast", "recon"}
    assert torch.isfinite(out["loss"]) and out["loss"].ndim == 0
    parts = out["parts"]
    torch.testing.assert_close(out["loss"], parts["rot"] + parts["contrast"] + parts["recon"])
    # One pair has no negatives: NT-Xent is exactly 0; an untrained 4-way classifier is near log 4.
    assert parts["contrast"].item() == 0.0
    assert 0.5 < parts["rot"].item() < 3.0 and parts["recon"].item() > 0


def test_backward_reaches_backbone_and_every_head(method):
    method.zero_grad()
    out = method(_batch(SMALL_ROI, batch_size=2), STEP)
    assert out["parts"]["contrast"] > 0  # two pairs: real negatives
    out["loss"].backward()
    student = method.student
    for name, module in [
        ("backbone", student.backbone),
        ("rotation", student.rotation_head),
        ("contrast", student.contrast_head),
        ("decoder", student.decoder),
    ]:
        grads = [p.grad for p in module.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads), name
        assert sum(g.abs().sum() for g in grads) > 0, name
        assert all(torch.isfinite(g).all() for g in grads), name
    assert method.teacher is None and method.momentum_pairs() == []
    method.zero_grad()


def test_weights_scale_the_parts(method):
    batch = _batch(SMALL_ROI, batch_size=2)
    weighted = SwinSSL(
        SwinSSLConfig(backbone_size="tiny", rotation_weight=2.0, contrast_weight=0.5, recon_weight=0.0)
    )
    weighted.load_state_dict(method.state_dict())
    with torch.no_grad():
        out = weighted(batch, STEP)
    parts = out["parts"]
    torch.testing.assert_close(out["loss"], 2.0 * parts["rot"] + 0.5 * parts["contrast"])


def test_export_loads_into_monai_swinunetr(method):
    net = SwinUNETR(in_channels=1, out_channels=2, feature_size=12)
    state = method.export_state_dict("swinunetr")
    encoder_keys = {k for k in net.state_dict() if k.startswith("swinViT.")}
    assert set(state) == encoder_keys
    missing, unexpected = net.load_state_dict(state, strict=False)
    assert not unexpected and not encoder_keys & set(missing)


def test_tiny_overfit_through_the_engine(tmp_path):
    from medssl3d.engine.trainer import Pretrainer

    torch.manual_seed(0)
    steps = 15
    # One fixed sample of one structured volume: the method must fit it.
    t = swin_ssl_transforms(SMALL_ROI)
    t.set_random_state(seed=0)
    sample = t({"image": _phantom((72, 40, 40))})
    trainer = Pretrainer(
        build_swin_ssl(backbone_size="tiny"),
        Dataset([sample] * steps),
        max_steps=steps,
        batch_size=1,
        lr=3e-4,
        warmup_steps=0,
        out_dir=str(tmp_path),
        tensorboard=False,
        log_every=5,
        resume=None,
    )
    history = trainer.run()["loss_history"]
    assert len(history) == steps and all(torch.isfinite(torch.tensor(history)))
    # Measured: 1.99 -> 0.60 (rotation CE falls from ~log 4, L1 from ~0.3); demand less than half.
    assert history[-1] < 0.5 * history[0]
    assert sum(history[-3:]) / 3 < min(history[:3])


def test_presets_mirror_the_dataclass():
    assert config_from_yaml(PRESETS, preset="base") == SwinSSLConfig()
    assert config_from_yaml(PRESETS, preset="no_paste_cutout") == SwinSSLConfig(paste_cutout=False)
    tiny = config_from_yaml(PRESETS, preset="tiny", temperature=0.2)
    assert tiny == SwinSSLConfig(backbone_size="tiny", temperature=0.2)
    with pytest.raises(ValueError, match="huge"):
        config_from_yaml(PRESETS, preset="huge")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"bogus": 1},
        {"temperature": 0.0},
        {"view_keys": ("a",)},
        {"rotation_weight": -1.0},
        {"paste_max_fraction": 0.0},
        {"paste_max_fraction": 1.5},
    ],
)
def test_bad_config_raises(kwargs):
    with pytest.raises(ValueError):
        build_swin_ssl(backbone_size="tiny", **kwargs)


def test_non_square_rotation_plane_raises():
    with pytest.raises(ValueError, match="rotation axes"):
        swin_ssl_transforms((64, 32, 64))


def test_too_few_tokens_raise(method):
    batch = _batch((32, 32, 32), batch_size=1)
    with pytest.raises(ValueError, match="token"), torch.no_grad():
        method(batch, STEP)


# ------------------------------------------------------------------ views: one crop, two draws
def test_views_are_one_crop_each_with_its_own_rotation_and_cutout():
    # Distinct voxel values: undoing each view's rotation by hand must give the same sub-block of the volume.
    volume = torch.arange(24 * 20 * 20, dtype=torch.float32).reshape(1, 24, 20, 20)
    windows = volume.unfold(1, 16, 1).unfold(2, 16, 1).unfold(3, 16, 1)
    t = swin_ssl_transforms((16, 16, 16))
    t.set_random_state(seed=0)
    rotation_pairs, masks_differ = set(), 0
    for _ in range(8):
        s = t({"image": volume})
        unrotated = [torch.rot90(s[v], -int(s[f"{v}_rot"]), dims=PLANE) for v in VIEWS]
        torch.testing.assert_close(unrotated[0], unrotated[1], rtol=0, atol=0)
        assert (windows == unrotated[0][0]).flatten(-3).all(-1).any()  # the label is the applied rotation
        rotation_pairs.add((int(s["view1_rot"]), int(s["view2_rot"])))
        cut = [torch.rot90(s[f"{v}_cutout"] != s[v], -int(s[f"{v}_rot"]), dims=PLANE) for v in VIEWS]
        masks_differ += not torch.equal(cut[0], cut[1])
    assert any(a != b for a, b in rotation_pairs)  # each view draws its own rotation
    assert masks_differ == 8  # and its own boxes


def test_independent_crops_is_an_option():
    volume = torch.arange(24 * 20 * 20, dtype=torch.float32).reshape(1, 24, 20, 20)
    t = swin_ssl_transforms((16, 16, 16), independent_crops=True)
    t.set_random_state(seed=0)
    same = 0
    for _ in range(4):
        s = t({"image": volume})
        unrotated = [torch.rot90(s[v], -int(s[f"{v}_rot"]), dims=PLANE) for v in VIEWS]
        same += torch.equal(unrotated[0], unrotated[1])
    assert same < 4


# ------------------------------------------------------------------ known answers with stub networks
STUB_ROI = (64, 32, 32)  # (R, A, S): 2 x 1 x 1 bottleneck tokens; A and S equal for the rotation


class RecordingBackbone(nn.Module):
    """Stands in for the SwinViT: records its input; its two tokens are a fixed map of 2x2x2 average pools."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim
        self.register_buffer("mix", torch.randn(8, 2 * dim, generator=torch.Generator().manual_seed(0)))
        self.inputs, self.tokens, self.features = [], [], []

    def forward(self, x):
        b = x.shape[0]
        tokens = (F.adaptive_avg_pool3d(x, 2).flatten(1) @ self.mix).view(b, 2, self.dim)
        feature = tokens.transpose(1, 2).reshape(b, self.dim, 2, 1, 1)
        self.inputs.append(x.clone())
        self.tokens.append(tokens)
        self.features.append(feature)
        return BackboneOutput(tokens=tokens, features=[feature], strides=(32,))


class RecordingDecoder(nn.Module):
    """Stands in for the decoder: records its input; output = sigmoid of the channel mean, upsampled."""

    def __init__(self):
        super().__init__()
        self.inputs, self.outputs = [], []

    def forward(self, feature):
        out = F.interpolate(torch.sigmoid(feature.mean(1, keepdim=True)), size=STUB_ROI, mode="nearest")
        self.inputs.append(feature.clone())
        self.outputs.append(out)
        return out


def _stub_method(**cfg):
    torch.manual_seed(0)
    method = build_swin_ssl(backbone_size="tiny", **cfg)
    method.student.backbone = RecordingBackbone(method.student.backbone.embed_dim)
    method.student.decoder = RecordingDecoder()
    return method


def _stub_batch(batch_size=3, seed=0):
    """Crops of distinct coarse patterns; each view rotates them by its own classes and blanks its own slab."""
    g = torch.Generator().manual_seed(seed)
    crops = F.interpolate(torch.rand(batch_size, 1, 2, 2, 2, generator=g), size=STUB_ROI, mode="nearest")
    crops = crops + 0.1 * torch.rand(batch_size, 1, *STUB_ROI, generator=g)
    batch = {}
    for v in VIEWS:
        k = torch.randint(4, (batch_size,), generator=g)
        clean = torch.stack([torch.rot90(c, int(ki), dims=PLANE) for c, ki in zip(crops, k, strict=True)])
        cut = clean.clone()
        for i, start in enumerate(torch.randint(STUB_ROI[0] - 16, (batch_size,), generator=g).tolist()):
            cut[i, :, start : start + 16] = -1.0
        batch[v], batch[f"{v}_cutout"], batch[f"{v}_rot"] = clean, cut, k
    return batch


def _hand_ntxent(e, positive, t=0.5):
    z = e / e.norm(dim=1, keepdim=True)
    total = 0.0
    for i in range(len(z)):
        den = sum(torch.exp(z[i] @ z[k] / t) for k in range(len(z)) if k != i)
        total = total - torch.log(torch.exp(z[i] @ z[positive[i]] / t) / den)
    return total / len(z)


def _hand_ce(logits, labels):
    return (torch.logsumexp(logits, 1) - logits[torch.arange(len(labels)), labels]).mean()


def test_losses_match_hand_computation_from_stub_outputs():
    method = _stub_method(paste_cutout=False)
    batch = _stub_batch()
    assert not torch.equal(batch["view1_rot"], batch["view2_rot"])  # a swapped label order would show
    with torch.no_grad():
        out = method(batch, STEP)
    backbone, decoder = method.student.backbone, method.student.decoder
    cut = torch.cat([batch["view1_cutout"], batch["view2_cutout"]])
    clean = torch.cat([batch["view1"], batch["view2"]])
    # One student call on both cut-out views; the decoder reads the bottleneck map.
    assert len(backbone.inputs) == 1
    torch.testing.assert_close(backbone.inputs[0], cut, rtol=0, atol=0)
    torch.testing.assert_close(decoder.inputs[0], backbone.features[0], rtol=0, atol=0)

    tokens, n = backbone.tokens[0], cut.shape[0]
    b = n // 2
    rot_head, contrast_head = method.student.rotation_head, method.student.contrast_head
    labels = torch.cat([batch["view1_rot"], batch["view2_rot"]])
    rot = _hand_ce(tokens[:, 0] @ rot_head.weight.T + rot_head.bias, labels)
    embedding = tokens[:, 1] @ contrast_head.weight.T + contrast_head.bias
    # Row i (view 1 of crop i) pairs with row b + i (view 2 of crop i), and back.
    contrast = _hand_ntxent(embedding, [(i + b) % n for i in range(n)])
    recon = (decoder.outputs[0] - clean).abs().mean()  # the rotated, un-cut views
    parts = out["parts"]
    torch.testing.assert_close(parts["rot"], rot)
    torch.testing.assert_close(parts["contrast"], contrast)
    torch.testing.assert_close(parts["recon"], recon)
    torch.testing.assert_close(out["loss"], rot + contrast + recon)  # weights 1:1:1

    # The answers are sharp: another crop as positive, the other token, or the cut input as target differ.
    other_crop = [b + (i + 1) % b if i < b else (i + 1) % b for i in range(n)]
    assert not torch.allclose(_hand_ntxent(embedding, other_crop), contrast, rtol=1e-3)
    assert not torch.allclose(_hand_ce(tokens[:, 1] @ rot_head.weight.T + rot_head.bias, labels), rot, rtol=1e-3)
    assert not torch.allclose((decoder.outputs[0] - cut).abs().mean(), recon, rtol=1e-3)


def test_paste_pass_takes_boxes_from_another_crops_un_cut_view():
    method = _stub_method()
    batch = _stub_batch()
    before = {k: v.clone() for k, v in batch.items()}
    torch.manual_seed(11)
    with torch.no_grad():
        out = method(batch, STEP)
    # By hand: one seed from torch's default generator; per view and sample a partner, and boxes if it differs.
    torch.manual_seed(11)
    rng = np.random.RandomState(int(torch.randint(MAX_SEED, ())))
    boxes = CutoutBoxes(max_fraction=0.3)
    expected, from_cut, pasted = [], [], 0
    for v in VIEWS:
        x, x_from_cut = batch[f"{v}_cutout"].clone(), batch[f"{v}_cutout"].clone()
        for i in range(len(x)):
            j = int(rng.randint(len(x)))
            if j != i:
                _, mask, fraction = boxes.draw(rng, STUB_ROI)
                m = torch.from_numpy(mask)
                assert 0 < fraction <= 0.3 and m.float().mean().item() == pytest.approx(fraction)
                x[i][:, m] = batch[v][j][:, m]
                x_from_cut[i][:, m] = batch[f"{v}_cutout"][j][:, m]
                pasted += 1
        expected.append(x)
        from_cut.append(x_from_cut)
    assert pasted >= 2
    torch.testing.assert_close(method.student.backbone.inputs[0], torch.cat(expected), rtol=0, atol=0)
    assert not torch.equal(torch.cat(expected), torch.cat(from_cut))  # the source is sharp: un-cut, not cut
    clean = torch.cat([batch["view1"], batch["view2"]])
    torch.testing.assert_close(out["parts"]["recon"], (method.student.decoder.outputs[0] - clean).abs().mean())
    for key, value in before.items():
        assert torch.equal(batch[key], value), key  # the batch itself is left as it was


def test_paste_draws_repeat_when_the_global_torch_rng_is_restored():
    # The engine checkpoints torch's default generator and restores it on resume.
    method = _stub_method()
    batch = _stub_batch()
    state = torch.get_rng_state()
    with torch.no_grad():
        method(batch, STEP)
        method(batch, STEP)
        torch.set_rng_state(state)
        method(batch, STEP)
    first, second, resumed = method.student.backbone.inputs
    assert not torch.equal(first, second)
    torch.testing.assert_close(resumed, first, rtol=0, atol=0)


def test_one_crop_per_batch_gets_no_paste_and_no_contrast():
    method = _stub_method()
    batch = _stub_batch(batch_size=1)
    with torch.no_grad():
        out = method(batch, STEP)
    cut = torch.cat([batch["view1_cutout"], batch["view2_cutout"]])
    torch.testing.assert_close(method.student.backbone.inputs[0], cut, rtol=0, atol=0)
    assert math.isclose(out["parts"]["contrast"].item(), 0.0, abs_tol=1e-6)  # one pair has no negatives
