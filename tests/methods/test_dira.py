from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from monai.data import list_data_collate
from monai.networks.nets import SwinUNETR
from torch import nn

from medssl3d.data.phantoms import make_phantom
from medssl3d.engine.checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint
from medssl3d.engine.trainer import Pretrainer
from medssl3d.methods.base import StepInfo
from medssl3d.methods.dira import (
    DiRA,
    DiraConfig,
    build_dira,
    check_standardisation_batch,
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
    """Two samples, each of its own phantom volume (volume ids 10 and 11)."""
    t = dira_transforms(ROI)
    t.set_random_state(seed=0)
    return list_data_collate([t({"image": _phantom((40, 40, 40), seed=i), "volume_id": 10 + i}) for i in range(2)])


def _method(**kw):
    torch.manual_seed(0)
    return build_dira(**{**TINY, **kw})


def test_base_preset_equals_dataclass_defaults_and_presets_load():
    assert config_from_yaml(PRESETS, "base") == DiraConfig()
    tiny = config_from_yaml(PRESETS, "tiny", stage="dira")
    assert tiny.backbone_size == "tiny" and tiny.stage == "dira"
    assert config_from_yaml(PRESETS, "tiny").stage == "dir"
    unet = config_from_yaml(PRESETS, "unet")
    assert unet.network == "unet" and asdict(unet) == {**asdict(DiraConfig()), "network": "unet"}
    official = config_from_yaml(PRESETS, "official")
    assert official == DiraConfig(distortion="exclusive", disc_variant="official")


def test_defaults_are_the_reference_numbers():
    c = DiraConfig()
    assert c.stage == "dir"  # the adversary starts from a dir checkpoint, never from scratch by default
    assert (c.dis_weight, c.res_weight, c.adv_weight) == (1.0, 10.0, 0.001)
    assert (c.moco_momentum, c.moco_queue_size, c.moco_temperature, c.barlow_lambda) == (0.999, 4096, 0.2, 5e-3)
    assert (c.disc_lr, c.disc_betas) == (2e-4, (0.5, 0.999))
    assert (c.distortion, c.disc_variant, c.volume_key, c.min_standardise_batch) == (
        "genesis", "pix2pix", "volume_id", 16)
    assert c.view_kwargs() == {"view_keys": ("view1", "view2"), "input_postfix": "_distorted",
                               "distortion": "genesis", "volume_key": "volume_id"}


@pytest.mark.parametrize(("field", "value"), [("stage", "gan"), ("variant", "byol"), ("network", "vit"),
                                              ("moco_momentum", 1.5), ("res_weight", -1.0),
                                              ("distortion", "mild"), ("disc_variant", "big"),
                                              ("min_standardise_batch", 0), ("volume_key", "view1")])
def test_bad_config_raises_value_error(field, value):
    with pytest.raises(ValueError, match=field):
        DiraConfig(**{field: value})
    with pytest.raises(ValueError, match="unknown DiraConfig fields"):
        build_dira(queue=3)


def test_transforms_keep_the_target_before_intensity_jitter():
    volume = _phantom((40, 40, 40))
    # No distortions: the input is the target up to the intensity jitter, an affine map a * x + b.
    t = dira_transforms(ROI, distortion_probs={"bezier_prob": 0.0, "shuffle_prob": 0.0, "paint_prob": 0.0},
                        intensity_prob=1.0)
    t.set_random_state(seed=1)
    sample = t({"image": volume, "volume_id": 4})
    assert set(sample) == {"view1", "view2", "view1_distorted", "view2_distorted", "volume_id"}
    assert sample["volume_id"].dtype == torch.long and int(sample["volume_id"]) == 4
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
    t = dira_transforms(ROI, distortion_probs={"bezier_prob": 1.0, "paint_prob": 1.0, "inpaint_rate": 0.0},
                        intensity_prob=0.0)
    t.set_random_state(seed=1)
    distorted = t({"image": volume, "volume_id": 4})
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
    assert method.moco_loss.queue_ids[ptr:ptr + 4].tolist() == [10, 11, 10, 11]  # k1 then k2, each with its volume
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


def _distance(method):
    student = dict(method.student.named_parameters())
    return {n: (p - student[n]).detach().clone() for n, p in method.teacher.named_parameters()}


def _perturbed_key_encoder(**kw):
    method = _method(moco_momentum=0.5, **kw).train()
    with torch.no_grad():  # move the key encoder away from the student so the update is visible
        for p in method.teacher.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return method


def test_momentum_encoder_moves_on_the_first_micro_batch_only(batch):
    method = _perturbed_key_encoder()
    before = _distance(method)
    with torch.no_grad():
        method(batch, StepInfo(step=0, total_steps=1, epoch=0, micro_batch=1))
    for name, d in _distance(method).items():
        torch.testing.assert_close(d, before[name])  # a later micro-batch of the step: no move
    with torch.no_grad():
        method(batch, StepInfo(step=0, total_steps=1, epoch=0, micro_batch=0))
    for name, d in _distance(method).items():
        torch.testing.assert_close(d, 0.5 * before[name])  # m = 0.5: the distance halves


def test_engine_with_accumulation_moves_the_key_encoder_once_per_optimizer_step(batch, tmp_path):
    method = _perturbed_key_encoder()
    student = dict(method.student.named_parameters())
    # The update runs before the step's first keys, towards the student as it was before the step.
    expected = {n: 0.5 * p.detach().clone() + 0.5 * student[n].detach().clone()
                for n, p in method.teacher.named_parameters()}
    samples = [{k: v[i] for k, v in batch.items()} for i in range(2)]
    trainer = Pretrainer(method, samples, max_steps=1, batch_size=1, accumulate_steps=2, out_dir=str(tmp_path),
                         tensorboard=False)
    assert trainer.run()["step"] == 1
    for name, p in method.teacher.named_parameters():
        torch.testing.assert_close(p, expected[name])  # moved twice it would sit at 0.25 K + 0.75 S


def test_exports_the_query_encoder_and_reports_its_key_encoder_s_own_momentum(batch, tmp_path):
    method = _perturbed_key_encoder()
    assert method.default_export_source() == "student"  # MoCo hands over the query encoder
    assert method.teacher_momentum(0.996) == 0.5  # the key encoder's own, not the engine's schedule
    samples = [{k: v[i] for k, v in batch.items()} for i in range(2)]
    trainer = Pretrainer(method, samples, max_steps=2, batch_size=1, out_dir=str(tmp_path), tensorboard=False)
    trainer.run()
    assert trainer.teacher_start_share() == pytest.approx(0.25)  # two updates at m = 0.5
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["export_source"] == "student"
    assert _method(variant="barlow").teacher_momentum(0.996) is None


def test_small_batches_are_refused_for_barlow_and_simsiam(batch):
    barlow, simsiam, moco = (DiraConfig(variant=v) for v in ("barlow", "simsiam", "moco"))
    with pytest.raises(ValueError, match=r"batch_size x world_size = 2 x 1 = 2 .*min_standardise_batch = 16"):
        check_standardisation_batch(barlow, batch_size=2)
    with pytest.raises(ValueError, match=r"batch_size x world_size = 8 x 1 = 8 "):
        check_standardisation_batch(DiraConfig(variant="barlow", gather_distributed=False), 8, world_size=4)
    check_standardisation_batch(barlow, batch_size=8, world_size=2)
    # the projectors' BatchNorm runs over one process's 2 x batch_size rows, whatever the world size
    with pytest.raises(ValueError, match=r"2 x batch_size = 2 x 4 = 8 rows .*min_standardise_batch = 16"):
        check_standardisation_batch(barlow, batch_size=4, world_size=8)
    with pytest.raises(ValueError, match=r"2 x batch_size = 2 x 2 = 4 rows"):
        check_standardisation_batch(simsiam, batch_size=2, world_size=8)
    check_standardisation_batch(simsiam, batch_size=8)
    check_standardisation_batch(moco, batch_size=1)
    # at construction when the bundle gives its batch size, else at the first forward
    with pytest.raises(ValueError, match="batch_size x world_size"):
        build_dira(**{**TINY, "variant": "barlow"}, batch_size=2)
    with pytest.raises(ValueError, match="batch_size x world_size = 2 x 1"):
        _method(variant="barlow")(batch, STEP)
    with pytest.raises(ValueError, match="2 x batch_size = 2 x 2 = 4 rows"):
        _method(variant="simsiam")(batch, STEP)


@pytest.mark.parametrize("variant", ["barlow", "simsiam"])
def test_other_variants_train(batch, variant):
    method = _method(variant=variant, stage="dir", min_standardise_batch=2).train()
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


# ------------------------------------------------------------------ known answers with stub networks
B, D = 2, 6  # crop pairs, embedding width of the stubs
M = 0.25  # key-encoder momentum in the stub tests


class StubStudent(nn.Module):
    """Returns fixed embeddings (2B, D), restorations (2B, 1, 4, 4, 4) [and predictions]; records its inputs."""

    def __init__(self, embedding, restoration, prediction=None):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))  # matched by name in the key encoder stub (momentum update)
        self.embedding, self.restoration, self.prediction = embedding, restoration, prediction
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x)
        out = {"embedding": self.embedding, "restoration": self.restoration}
        if self.prediction is not None:
            out["prediction"] = self.prediction
        return out


class StubKeyEncoder(nn.Module):
    def __init__(self, keys):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3), requires_grad=False)
        self.keys = keys
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x)
        return self.keys


class StubDiscriminator(nn.Module):
    """Scores each volume by its mean intensity, on a 2^3 grid; records every input."""

    def __init__(self):
        super().__init__()
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x)
        return x.mean(dim=(1, 2, 3, 4))[:, None, None, None, None].expand(-1, 1, 2, 2, 2)


def _stub_batch():
    g = torch.Generator().manual_seed(3)
    views = {v: 0.6 + 0.3 * torch.rand(B, 1, 4, 4, 4, generator=g) for v in ("view1", "view2")}
    distorted = {f"{v}_distorted": torch.rand(B, 1, 4, 4, 4, generator=g) for v in ("view1", "view2")}
    return {**views, **distorted, "volume_id": torch.tensor([5, 9])}


def _stubbed(variant, stage="dira", with_prediction=False):
    g = torch.Generator().manual_seed(4)
    method = _method(variant=variant, stage=stage, moco_momentum=M, min_standardise_batch=2).train()
    embedding = torch.randn(2 * B, D, generator=g).requires_grad_()
    prediction = torch.randn(2 * B, D, generator=g).requires_grad_() if with_prediction else None
    restoration = 0.1 + 0.2 * torch.rand(2 * B, 1, 4, 4, 4, generator=g)  # far from the targets' 0.6..0.9
    method.student = StubStudent(embedding, restoration.requires_grad_(), prediction)
    if variant == "moco":
        method.teacher = StubKeyEncoder(torch.randn(2 * B, D, generator=g))
        method.moco_loss = type(method.moco_loss)(D, queue_size=6, temperature=0.2, gather_distributed=False)
    if stage == "dira":
        method.discriminator = StubDiscriminator()
    return method


def _nce(q, k, queue, query_ids, queue_ids, t):
    """InfoNCE by hand: positive q·k, negatives q·queue except the query's own volume's entries."""
    q, k = q / q.norm(dim=1, keepdim=True), k / k.norm(dim=1, keepdim=True)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], dim=1) / t
    own = torch.cat([torch.zeros(len(q), 1, dtype=torch.bool), query_ids[:, None] == queue_ids[None, :]], dim=1)
    logits = logits.masked_fill(own, float("-inf"))
    return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()


def test_moco_known_answer_crossed_pairs_masked_own_volume_and_inputs():
    method, batch = _stubbed("moco", stage="dir"), _stub_batch()
    g = torch.Generator().manual_seed(5)
    queue = F.normalize(torch.randn(6, D, generator=g), dim=1)
    queue_ids = torch.tensor([5, 1, 9, -1, 5, 2])  # entries 0, 4 of volume 5 and 2 of volume 9: not negatives
    method.moco_loss.queue.copy_(queue)
    method.moco_loss.queue_ids.copy_(queue_ids)
    out = method(batch, STEP)

    distorted = torch.cat([batch["view1_distorted"], batch["view2_distorted"]])
    (student_in,), (key_in,) = method.student.inputs, method.teacher.inputs
    assert torch.equal(student_in, distorted) and torch.equal(key_in, distorted)  # both get the distorted views
    z1, z2 = method.student.embedding.detach().chunk(2)
    k1, k2 = method.teacher.keys.chunk(2)
    ids = batch["volume_id"]
    expected = 0.5 * (_nce(z1, k2, queue, ids, queue_ids, 0.2) + _nce(z2, k1, queue, ids, queue_ids, 0.2))
    torch.testing.assert_close(out["parts"]["dis"], expected)
    same_view = 0.5 * (_nce(z1, k1, queue, ids, queue_ids, 0.2) + _nce(z2, k2, queue, ids, queue_ids, 0.2))
    unmasked = 0.5 * (_nce(z1, k2, queue, ids, torch.full((6,), -1), 0.2)
                      + _nce(z2, k1, queue, ids, torch.full((6,), -1), 0.2))
    assert not torch.allclose(expected, same_view) and not torch.allclose(expected, unmasked)
    # then both key sets (k1, k2) are queued with their volumes' ids, oldest first
    torch.testing.assert_close(method.moco_loss.queue[:4], F.normalize(torch.cat([k1, k2]), dim=1))
    assert method.moco_loss.queue_ids.tolist() == [5, 9, 5, 9, 5, 2] and int(method.moco_loss.queue_ptr) == 4
    # the key encoder moved once towards the student: w_k = M * 0 + (1 - M) * 1
    torch.testing.assert_close(method.teacher.w, torch.full((3,), 1 - M))


def test_restoration_adversarial_discriminator_and_weights_known_answers():
    method, batch = _stubbed("moco", stage="dira"), _stub_batch()
    queue = method.moco_loss.queue.clone()
    out = method(batch, STEP)
    parts = out["parts"]
    restored = method.student.restoration.detach()
    targets = torch.cat([batch["view1"], batch["view2"]])  # the undistorted views

    res = ((restored - targets) ** 2).mean()
    torch.testing.assert_close(parts["res"], res)
    (judged,) = method.discriminator.inputs
    assert torch.equal(judged, method.student.restoration)  # the generator term judges the live restorations
    c_fake = restored.mean(dim=(1, 2, 3, 4))
    adv = ((c_fake - 1) ** 2).mean()  # the generator aims at the real label 1
    torch.testing.assert_close(parts["adv"], adv)
    z1, z2 = method.student.embedding.detach().chunk(2)
    k1, k2 = method.teacher.keys.chunk(2)
    no_ids = torch.full((queue.shape[0],), -1)
    ids = batch["volume_id"]
    dis = 0.5 * (_nce(z1, k2, queue, ids, no_ids, 0.2) + _nce(z2, k1, queue, ids, no_ids, 0.2))
    torch.testing.assert_close(out["loss"], 1.0 * dis + 10.0 * res + 0.001 * adv)

    method.discriminator.inputs.clear()
    (aux,) = method.auxiliary_objectives()
    disc = aux.loss(batch, out, STEP)
    real_in = [x for x in method.discriminator.inputs if torch.equal(x, targets)]
    fake_in = [x for x in method.discriminator.inputs if torch.equal(x, restored)]
    assert len(method.discriminator.inputs) == 2 and len(real_in) == len(fake_in) == 1
    assert not any(x.requires_grad for x in method.discriminator.inputs)  # detached restorations and targets
    c_real = targets.mean(dim=(1, 2, 3, 4))
    torch.testing.assert_close(disc["loss"], 0.5 * (((c_real - 1) ** 2).mean() + (c_fake**2).mean()))
    torch.testing.assert_close(disc["parts"]["real_score"], c_real.mean())
    torch.testing.assert_close(disc["parts"]["fake_score"], c_fake.mean())


def _standardised(z):
    return (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5)


def test_barlow_known_answer_pairs_view1_with_view2():
    method, batch = _stubbed("barlow", stage="dir"), _stub_batch()
    out = method(batch, STEP)
    z1, z2 = method.student.embedding.detach().chunk(2)
    c = _standardised(z1).T @ _standardised(z2) / B
    on, off = ((torch.diagonal(c) - 1) ** 2).sum(), (c**2).sum() - (torch.diagonal(c) ** 2).sum()
    torch.testing.assert_close(out["parts"]["dis"], on + 5e-3 * off)
    (student_in,) = method.student.inputs
    assert torch.equal(student_in, torch.cat([batch["view1_distorted"], batch["view2_distorted"]]))


def test_simsiam_known_answer_crossed_with_stop_gradient():
    method, batch = _stubbed("simsiam", stage="dir", with_prediction=True), _stub_batch()
    out = method(batch, STEP)
    student = method.student
    z1, z2 = student.embedding.detach().chunk(2)
    p1, p2 = student.prediction.detach().chunk(2)
    expected = -0.5 * (F.cosine_similarity(p1, z2, dim=1).mean() + F.cosine_similarity(p2, z1, dim=1).mean())
    torch.testing.assert_close(out["parts"]["dis"], expected)
    uncrossed = -0.5 * (F.cosine_similarity(p1, z1, dim=1).mean() + F.cosine_similarity(p2, z2, dim=1).mean())
    assert not torch.allclose(expected, uncrossed)
    out["loss"].backward()
    assert student.embedding.grad is None  # the targets z are stop-gradient
    assert student.prediction.grad is not None and student.prediction.grad.abs().sum() > 0
