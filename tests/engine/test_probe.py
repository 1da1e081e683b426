import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.data import Dataset
from torch import nn

from medssl3d.bundle_support.smoke_data import write_smoke_datalist
from medssl3d.data.phantoms import make_phantom
from medssl3d.data.presets import CT_PRESET
from medssl3d.engine.probe import (
    ProbeHead,
    SegmentationProbe,
    crop_around_label,
    find_backbone,
    gather_points,
    sample_points,
)
from medssl3d.engine.trainer import Pretrainer
from medssl3d.methods.swin_ssl import SwinSSL, SwinSSLConfig, swin_ssl_transforms
from medssl3d.networks.backbones import BackboneOutput, SwinBackbone

pytestmark = pytest.mark.usefixtures("one_thread")

ROI = (32, 32, 32)  # the probe crop: the smallest a Swin backbone takes
TRAIN_ROI = (64, 32, 32)  # the smallest crop giving SwinSSL's heads their two tokens
KEPT_CLASSES = 4  # background, body, fat, liver: phantom labels above are set to 0 in known-answer tests


def _phantom_volumes(n=3, shape=(40, 40, 40), max_class=None):
    out = []
    for seed in range(n):
        p = make_phantom(shape=shape, seed=seed)
        label = torch.from_numpy(p.label.astype(np.int64))
        if max_class is not None:
            label[label > max_class] = 0
        out.append({"image": torch.from_numpy(p.windowed()), "label": label})
    return out


class LabelFeatures(nn.Module):
    """A fake backbone whose features are the one-hot of the (integer) image, pooled to strides 2 and 4."""

    def __init__(self, num_classes):
        super().__init__()
        self.num_classes = num_classes
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        onehot = F.one_hot(x[:, 0].round().long(), self.num_classes).movedim(-1, 1).float() * self.scale
        return BackboneOutput(tokens=None, features=[F.avg_pool3d(onehot, 2), F.avg_pool3d(onehot, 4)],
                              strides=(2, 4))


class NoiseFeatures(nn.Module):
    """A fake backbone whose features are noise, independent of the input."""

    def __init__(self, channels=16):
        super().__init__()
        self.channels = channels
        self.scale = nn.Parameter(torch.ones(()))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        g = torch.Generator().manual_seed(self.calls)
        shape = (x.shape[0], self.channels, *(s // 2 for s in x.shape[2:]))
        return BackboneOutput(tokens=None, features=[torch.randn(shape, generator=g) * self.scale], strides=(2,))


# ----------------------------------------------------------------------------- pieces
@pytest.mark.parametrize("hidden", [None, 6])
def test_volume_head_equals_the_point_head_at_every_voxel(hidden):
    g = torch.Generator().manual_seed(0)
    features = [torch.randn(1, 3, 4, 8, 2, generator=g), torch.randn(1, 5, 2, 4, 1, generator=g)]
    size = (16, 32, 8)
    head = ProbeHead([3, 5], 4, hidden, generator=g)
    with torch.no_grad():
        for w in head.level_weights:
            w.normal_(generator=g)
    head.set_normalisation([torch.randn(50, 3, generator=g), 2 + 3 * torch.randn(50, 5, generator=g)])
    points = torch.stack(torch.unravel_index(torch.arange(16 * 32 * 8), size), dim=1)
    with torch.no_grad():
        volume = head.forward_volume(features, size)
        at_points = head.forward_points([gather_points(f, points, size) for f in features])
    torch.testing.assert_close(volume[0].reshape(4, -1).t(), at_points, rtol=1e-5, atol=1e-5)


def test_gather_points_is_trilinear_upsampling_at_the_points():
    g = torch.Generator().manual_seed(1)
    feature = torch.randn(1, 2, 3, 5, 4, generator=g)
    size = (12, 10, 16)
    up = F.interpolate(feature, size=size, mode="trilinear", align_corners=False)
    points = torch.tensor([[0, 0, 0], [11, 9, 15], [5, 3, 7], [1, 8, 0]])
    expected = up[0][:, points[:, 0], points[:, 1], points[:, 2]].t()
    torch.testing.assert_close(gather_points(feature, points, size), expected)


def test_sample_points_splits_evenly_over_classes():
    label = torch.zeros(8, 8, 8, dtype=torch.long)
    label[:2] = 1  # 128 voxels
    label[0, 0, :3] = 2  # 3 voxels
    points = sample_points(label, 90, torch.Generator().manual_seed(0))
    classes = label[tuple(points.t())]
    assert torch.bincount(classes).tolist() == [30, 30, 3]  # class 2 has fewer voxels than its share
    assert len({tuple(p) for p in points.tolist()}) == len(points)  # no voxel twice


def test_crop_around_label_pads_and_centres_on_the_labels():
    image = torch.arange(20 * 30 * 10, dtype=torch.float32).reshape(20, 30, 10)
    label = torch.zeros_like(image)
    label[15:19, 2:6, 4:6] = 1
    crop_image, crop_label = crop_around_label(image, label, (8, 8, 16))
    assert crop_image.shape == crop_label.shape == (8, 8, 16)
    assert crop_label.sum() == label.sum()  # every labelled voxel kept
    assert (crop_image[:, :, :3] == 0).all() and (crop_image[:, :, 3:13] > 0).all()  # 6 pad voxels, split 3 / 3


def test_find_backbone_prefers_the_teacher():
    class Method(nn.Module):
        def __init__(self, teacher):
            super().__init__()
            self.student = nn.Module()
            self.student.backbone = nn.Linear(1, 1)
            self.teacher = None
            if teacher:
                self.teacher = nn.ModuleDict({"backbone": nn.Linear(1, 1)})

    with_teacher, without = Method(True), Method(False)
    assert find_backbone(with_teacher) is with_teacher.teacher["backbone"]
    assert find_backbone(with_teacher, "student") is with_teacher.student.backbone
    assert find_backbone(without) is without.student.backbone
    with pytest.raises(ValueError, match="teacher.backbone"):
        find_backbone(without, "teacher")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(every_n_steps=0), "every_n_steps"),
        (dict(head="transformer"), "head"),
        (dict(roi_size=(32, 32)), "roi_size"),
        (dict(num_val=3), "at least 4"),
        (dict(max_volumes=1), "max_volumes"),
        (dict(num_classes=1), "num_classes"),
        (dict(source="ema"), "source"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SegmentationProbe(_phantom_volumes(), **kwargs)


def test_file_paths_need_a_preset():
    with pytest.raises(ValueError, match="preset"):
        SegmentationProbe([{"image": "a.nii.gz", "label": "a_seg.nii.gz"}] * 2)


def test_label_beyond_num_classes_raises():
    probe = SegmentationProbe(_phantom_volumes(), num_classes=3, roi_size=ROI)
    with pytest.raises(ValueError, match="outside"):
        probe.volumes()


# ----------------------------------------------------------------------------- known answers
def _integer_phantoms():
    """Phantoms whose image is the label: the features of LabelFeatures then encode the label exactly."""
    return [{"image": v["label"].float(), "label": v["label"]} for v in _phantom_volumes(max_class=KEPT_CLASSES - 1)]


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_features_that_encode_the_label_give_a_high_dice(head):
    probe = SegmentationProbe(_integer_phantoms(), roi_size=ROI, head=head, hidden_channels=8)
    scalars = probe.evaluate(LabelFeatures(KEPT_CLASSES))
    # Measured 0.95 (linear): the one-hot is pooled to strides 2 and 4, which blurs the thin fat rim.
    assert scalars["probe/dice"] > 0.9
    assert set(scalars) == {"probe/dice", "probe/dice_1", "probe/dice_2", "probe/dice_3", "probe/fit_loss"}
    assert min(scalars[f"probe/dice_{c}"] for c in (1, 2, 3)) > 0.85


def test_noise_features_give_a_low_dice():
    scalars = SegmentationProbe(_integer_phantoms(), roi_size=ROI).evaluate(NoiseFeatures())
    # Measured 0.21: chance level for balanced predictions over 4 classes.
    assert scalars["probe/dice"] < 0.4
    assert scalars["probe/fit_loss"] > 0.9 * np.log(KEPT_CLASSES)


def test_a_datalist_with_a_preset_is_read_once_with_its_class_names(tmp_path):
    path = write_smoke_datalist(tmp_path / "data", n_train=2, n_val=1, shape=(40, 40, 40))
    datalist = json.loads(Path(path).read_text())
    datalist["training"].insert(0, {"image": datalist["training"][0]["image"]})  # unlabelled: left out
    Path(path).write_text(json.dumps(datalist))
    probe = SegmentationProbe(path, preset=CT_PRESET, roi_size=ROI, points_per_volume=512)
    volumes = probe.volumes()
    assert probe.volumes() is volumes and len(volumes) == 3  # cached
    assert volumes[0][0].shape == (1, 1, *ROI) and volumes[0][1].shape == ROI
    assert probe.num_classes == 7  # inferred from the labels
    scalars = probe.evaluate(NoiseFeatures())
    assert "probe/dice_liver" in scalars and "probe/dice_background" not in scalars


# ----------------------------------------------------------------------------- isolation
def test_evaluate_restores_modes_flags_gradients_and_rngs():
    torch.manual_seed(0)
    backbone = SwinBackbone(size="tiny")
    backbone.train()
    backbone.net.swinViT.layers1.eval()  # a mixed state must come back as it was
    frozen = backbone.net.swinViT.patch_embed.proj.weight
    frozen.requires_grad_(False)
    for p in backbone.parameters():
        if p.requires_grad:
            p.grad = torch.full_like(p, 0.5)
    modes = {n: m.training for n, m in backbone.named_modules()}
    flags = {n: p.requires_grad for n, p in backbone.named_parameters()}
    weights = {n: p.detach().clone() for n, p in backbone.named_parameters()}

    torch.manual_seed(123)
    np.random.seed(123)
    expected = torch.rand(3), np.random.rand(3)
    torch.manual_seed(123)
    np.random.seed(123)
    SegmentationProbe(_phantom_volumes(), roi_size=ROI, points_per_volume=256, fit_iterations=5).evaluate(backbone)
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])
    assert {n: m.training for n, m in backbone.named_modules()} == modes
    assert {n: p.requires_grad for n, p in backbone.named_parameters()} == flags
    assert frozen.grad is None
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in backbone.parameters() if p.requires_grad)
    assert all(torch.equal(p, weights[n]) for n, p in backbone.named_parameters())


# ----------------------------------------------------------------------------- in a real run
class NoisySwinSSL(SwinSSL):
    """SwinSSL whose inputs get noise from the global RNG, so any draw by a handler changes the losses."""

    def forward(self, batch, step):
        batch = {k: v + 0.05 * torch.randn_like(v) if torch.is_tensor(v) and v.ndim == 5 else v
                 for k, v in batch.items()}
        return super().forward(batch, step)


class DrawsFromTheGlobalRng:
    """A careless handler: the control showing that the loss comparison can fail."""

    def attach(self, trainer):
        trainer.add_event_handler("iteration_completed", lambda t: torch.rand(1))


def _run(out_dir, handlers=(), steps=4):
    torch.manual_seed(0)
    method = NoisySwinSSL(SwinSSLConfig(backbone_size="tiny"))
    images = [{"image": v["image"][None]} for v in _phantom_volumes(n=2, shape=(72, 40, 40))]
    data = Dataset(images * 2, transform=swin_ssl_transforms(TRAIN_ROI))
    trainer = Pretrainer(method, data, max_steps=steps, batch_size=1, log_every=3, out_dir=str(out_dir),
                         tensorboard=False, deterministic=True, resume=None, handlers=list(handlers))
    summary = trainer.run()
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return method, summary, records


def test_probe_fires_every_n_steps_and_leaves_training_unchanged(tmp_path):
    probe = SegmentationProbe(_phantom_volumes(), roi_size=ROI, every_n_steps=2, points_per_volume=1024)
    method, with_probe, records = _run(tmp_path / "probe", [probe, None])  # None: a disabled bundle handler
    _, without, plain_records = _run(tmp_path / "plain")
    _, careless, _ = _run(tmp_path / "careless", [DrawsFromTheGlobalRng()], steps=2)

    assert with_probe["loss_history"] == without["loss_history"]  # exactly: same steps, same RNG draws
    assert careless["loss_history"][1] != without["loss_history"][1]  # the comparison can fail
    assert [r["step"] for r in plain_records] == [3, 4]
    assert [r["step"] for r in records] == [2, 3, 4]  # a probe step is recorded off the log_every grid
    probed = [r for r in records if "probe/dice" in r]
    assert [r["step"] for r in probed] == [2, 4]
    for r in probed:
        assert 0.0 <= r["probe/dice"] <= 1.0 and "probe/dice_3" in r and "loss" in r
        assert r["probe/time_s"] > 0 and r["probe/time_fraction"] > 0
    assert method.training and all(m.training for m in method.student.modules())
