from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from monai.data import list_data_collate
from monai.networks.nets import SwinUNETR

from medssl3d.data.phantoms import make_phantom
from medssl3d.engine.checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint
from medssl3d.engine.trainer import Pretrainer
from medssl3d.methods.base import StepInfo
from medssl3d.methods.dira import (
    DiRA,
    DiraConfig,
    build_dira,
    config_from_yaml,
    dira_transforms,
    init_from_checkpoint,
)
from medssl3d.transfer.export import load_pretrained

pytestmark = pytest.mark.usefixtures("one_thread")

PRESETS = Path(__file__).resolve().parents[2] / "configs" / "methods" / "dira.yaml"
ROI = (32, 32, 32)
STEP = StepInfo(step=0, total_steps=1, epoch=0)
# A U-Net small enough for unit tests at 32^3; the Swin preset is exercised by the export test and the bundle.
TINY = dict(network="unet", unet_features=(4, 4, 8, 8, 16, 4), proj_hidden_dim=32, moco_dim=16, barlow_dim=16,
            simsiam_dim=16, simsiam_pred_dim=8, moco_queue_size=8, disc_channels=4)


def _phantom(shape, seed=0):
    return torch.from_numpy(make_phantom(shape=shape, seed=seed).windowed())[None]


@pytest.fixture(scope="module")
def batch():
    t = dira_transforms(ROI)
    t.set_random_state(seed=0)
    volume = _phantom((40, 40, 40))
    return list_data_collate([t({"image": volume}) for _ in range(2)])


def _method(**kw):
    torch.manual_seed(0)
    return build_dira(**{**TINY, **kw})


def test_base_preset_equals_dataclass_defaults_and_presets_load():
    assert config_from_yaml(PRESETS, "base") == DiraConfig()
    tiny = config_from_yaml(PRESETS, "tiny", stage="dir")
    assert tiny.backbone_size == "tiny" and tiny.stage == "dir"
    unet = config_from_yaml(PRESETS, "unet")
    assert unet.network == "unet" and asdict(unet) == {**asdict(DiraConfig()), "network": "unet"}


def test_defaults_are_the_reference_numbers():
    c = DiraConfig()
    assert (c.dis_weight, c.res_weight, c.adv_weight) == (1.0, 10.0, 0.001)
    assert (c.moco_momentum, c.moco_queue_size, c.moco_temperature, c.barlow_lambda) == (0.999, 4096, 0.2, 5e-3)
    assert (c.disc_lr, c.disc_betas) == (2e-4, (0.5, 0.999))


@pytest.mark.parametrize(("field", "value"), [("stage", "gan"), ("variant", "byol"), ("network", "vit"),
                                              ("moco_momentum", 1.5), ("res_weight", -1.0)])
def test_bad_config_raises_value_error(field, value):
    with pytest.raises(ValueError, match=field):
        DiraConfig(**{field: value})
    with pytest.raises(ValueError, match="unknown DiraConfig fields"):
        build_dira(queue=3)


def test_transforms_keep_the_target_before_intensity_jitter():
    volume = _phantom((40, 40, 40))
    # No distortions: the input is the target up to the intensity jitter, an affine map a * x + b.
    t = dira_transforms(ROI, bezier_prob=0.0, shuffle_prob=0.0, paint_prob=0.0, intensity_prob=1.0)
    t.set_random_state(seed=1)
    sample = t({"image": volume})
    assert set(sample) == {"view1", "view2", "view1_distorted", "view2_distorted"}
    for v in ("view1", "view2"):
        x, y = sample[v], sample[f"{v}_distorted"]
        assert x.shape == y.shape == (1, *ROI) and type(x) is torch.Tensor
        assert not torch.allclose(x, y)
        flat_x, flat_y = x.flatten().double(), y.flatten().double()
        i, j = int(flat_x.argmin()), int(flat_x.argmax())
        a = (flat_y[j] - flat_y[i]) / (flat_x[j] - flat_x[i])
        torch.testing.assert_close(flat_y, a * (flat_x - flat_x[i]) + flat_y[i], atol=1e-5, rtol=0)
    assert not torch.equal(sample["view1"], sample["view2"])  # two different crops
    # And with the distortions on (fixed seed), the target is still the clean crop: in [0, 1], smooth.
    t = dira_transforms(ROI, bezier_prob=1.0, paint_prob=1.0, inpaint_rate=0.0, intensity_prob=0.0)
    t.set_random_state(seed=1)
    distorted = t({"image": volume})
    torch.testing.assert_close(distorted["view1"], sample["view1"])
    assert not torch.allclose(distorted["view1_distorted"], distorted["view1"])


@pytest.mark.parametrize("stage", ["dir", "dira"])
def test_weighted_total_and_parts(batch, stage):
    method = _method(stage=stage)
    out = method.eval()(batch, STEP)
    parts = out["parts"]
    expected = parts["dis"] + 10.0 * parts["res"]
    if stage == "dira":
        expected = expected + 0.001 * parts["adv"]
        assert len(method.auxiliary_objectives()) == 1
    else:
        assert "adv" not in parts and method.discriminator is None and method.auxiliary_objectives() == []
    torch.testing.assert_close(out["loss"], expected)
    assert out["fake"].shape == out["real"].shape == (4, 1, *ROI)
    assert not out["fake"].requires_grad and 0 < out["fake"].min() and out["fake"].max() < 1


def test_moco_keys_come_from_the_momentum_encoder_without_gradients(batch):
    method = _method(moco_momentum=0.5).train()
    with torch.no_grad():  # move the key encoder away from the student so the update is visible
        for p in method.teacher.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    student = dict(method.student.named_parameters())
    expected = {n: 0.5 * p.detach().clone() + 0.5 * student[n].detach() for n, p in method.teacher.named_parameters()}
    ptr = int(method.moco_loss.queue_ptr)
    out = method(batch, STEP)
    out["loss"].backward()
    for name, p in method.teacher.named_parameters():
        assert not p.requires_grad and p.grad is None
        torch.testing.assert_close(p, expected[name])
    inputs = torch.cat([batch["view1_distorted"], batch["view2_distorted"]])
    with torch.no_grad():
        keys = F.normalize(method.teacher(inputs), dim=1)
    torch.testing.assert_close(method.moco_loss.queue[ptr:ptr + 4], keys, atol=1e-5, rtol=1e-4)
    assert int(method.moco_loss.queue_ptr) == (ptr + 4) % 8
    assert {"moco_loss.queue", "moco_loss.queue_ptr"} <= set(method.state_dict())
    assert method.momentum_pairs() == []  # the engine does not also EMA it


def test_eval_forward_leaves_queue_and_key_encoder_alone(batch):
    method = _method().eval()
    queue, teacher = method.moco_loss.queue.clone(), [p.clone() for p in method.teacher.parameters()]
    with torch.no_grad():
        method(batch, STEP)
    assert torch.equal(method.moco_loss.queue, queue)
    assert all(torch.equal(a, b) for a, b in zip(method.teacher.parameters(), teacher, strict=True))


@pytest.mark.parametrize("variant", ["barlow", "simsiam"])
def test_other_variants_train(batch, variant):
    method = _method(variant=variant, stage="dir").train()
    assert method.teacher is None
    out = method(batch, STEP)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    projector = next(method.student.projector.parameters())
    assert projector.grad is not None and projector.grad.abs().sum() > 0
    if variant == "simsiam":
        assert -1.0 <= out["parts"]["dis"] <= 1.0


def test_generator_and_discriminator_steps_update_only_their_own_parameters(batch):
    method = _method(stage="dira").train()
    disc = list(method.discriminator.parameters())
    gen = [p for p in method.student.parameters()]
    # The engine's order: the main loss with the discriminator frozen, then the auxiliary loss.
    for p in disc:
        p.requires_grad_(False)
    out = method(batch, STEP)
    out["loss"].backward()
    for p in disc:
        p.requires_grad_(True)
    assert all(p.grad is None for p in disc)
    assert sum(float(p.grad.abs().sum()) for p in gen if p.grad is not None) > 0
    method.zero_grad(set_to_none=True)
    (aux,) = method.auxiliary_objectives()
    aux_out = aux.loss(batch, out, STEP)
    aux_out["loss"].backward()
    assert all(p.grad is None for p in gen)
    assert all(p.grad is not None for p in disc)
    assert set(aux_out["parts"]) == {"real_score", "fake_score"}


def test_engine_steps_both_optimizers_and_checkpoints_discriminator_and_queue(batch, tmp_path):
    method = _method(stage="dira")
    samples = [{k: v[i] for k, v in batch.items()} for i in range(2)]
    before = {k: v.clone() for k, v in method.state_dict().items()}
    trainer = Pretrainer(method, samples, max_steps=1, batch_size=2, out_dir=str(tmp_path), tensorboard=False)
    summary = trainer.run()
    assert summary["step"] == 1
    main_ids = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not main_ids & {id(p) for p in method.discriminator.parameters()}
    (adam,) = trainer.aux_optimizers.values()
    assert isinstance(adam, torch.optim.Adam) and adam.param_groups[0]["betas"] == (0.5, 0.999)
    after = method.state_dict()
    for prefix in ("student.", "discriminator.", "moco_loss.queue"):
        assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith(prefix)), prefix
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert set(ckpt["auxiliary"]) == {"discriminator"} and ckpt["auxiliary"]["discriminator"]["state"]
    for key in ("moco_loss.queue", "moco_loss.queue_ptr", "discriminator.model.0.weight"):
        torch.testing.assert_close(ckpt["model"][key], after[key])


def test_init_from_checkpoint_takes_everything_but_the_discriminator(tmp_path):
    source = _method(stage="dir")
    source.moco_loss.enqueue(torch.randn(3, 16))
    path = save_checkpoint({"format_version": FORMAT_VERSION, "method": "dira", "backbone": source.backbone_name,
                            "model": source.state_dict(), "step": 5}, tmp_path / "dir.pt")
    torch.manual_seed(1)
    target = build_dira(**{**TINY, "stage": "dira"})
    disc = {k: v.clone() for k, v in target.discriminator.state_dict().items()}
    assert init_from_checkpoint(target, path) is target
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    assert all(torch.equal(target.discriminator.state_dict()[k], v) for k, v in disc.items())
    assert init_from_checkpoint(target, "") is target
    with pytest.raises(ValueError, match="another variant"):
        init_from_checkpoint(build_dira(**{**TINY, "variant": "barlow"}), path)
    with pytest.raises(ValueError, match="backbone"):
        init_from_checkpoint(build_dira(**{**TINY, "unet_features": (4, 4, 8, 8, 16, 8)}), path)


def test_swin_export_fills_swinunetr_encoder_and_decoder():
    method = DiRA(DiraConfig(backbone_size="tiny", stage="dir", moco_queue_size=8, proj_hidden_dim=32))
    net = SwinUNETR(in_channels=1, out_channels=2, feature_size=12)
    report = load_pretrained(net, method.export_state_dict("swinunetr"))
    assert report.encoder_matched == report.encoder_total > 0
    # everything but SwinUNETR's task-specific out conv (weight, bias)
    assert report.decoder_matched == report.decoder_total - 2 > 0
    assert report.unexpected == []


def test_unet_preset_uses_monai_basicunet_and_exports_its_keys():
    from monai.networks.nets import BasicUNet

    method = _method(stage="dir")
    net = BasicUNet(spatial_dims=3, in_channels=1, out_channels=3, features=TINY["unet_features"])
    exported = method.export_state_dict("basicunet")
    missing, unexpected = net.load_state_dict(exported, strict=False)
    assert unexpected == [] and sorted(missing) == ["final_conv.bias", "final_conv.weight"]
    with pytest.raises(ValueError, match="basicunet"):
        method.export_state_dict("swinunetr")
