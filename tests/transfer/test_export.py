import logging

import pytest
import torch
from monai.networks.nets import UNETR, SwinUNETR
from torch import nn

from medssl3d.networks.backbones import SwinBackbone, ViTBackbone
from medssl3d.transfer.export import (
    STUDENT_BACKBONE_PREFIX,
    LoadReport,
    default_source,
    export_weights,
    load_pretrained,
    load_pretrained_into,
    save_weights,
)

SIDE = 64


def _volume(side=SIDE, seed=0):
    return torch.randn(1, 1, side, side, side, generator=torch.Generator().manual_seed(seed))


def _n_prefixed(net, prefix):
    return sum(k.startswith(prefix) for k in net.state_dict())


@pytest.fixture(scope="module")
def swin_encoder():
    torch.manual_seed(1)
    return SwinBackbone("tiny").eval()


def test_swin_export_loads_every_swinvit_tensor_and_reproduces_the_encoder(swin_encoder, caplog):
    state = swin_encoder.export_state_dict("swinunetr")
    assert all(k.startswith("swinViT.") for k in state)
    torch.manual_seed(2)
    net = SwinUNETR(in_channels=1, out_channels=3, feature_size=12).eval()
    n_enc = _n_prefixed(net, "swinViT.")
    with caplog.at_level(logging.INFO, logger="medssl3d.transfer.export"):
        report = load_pretrained(net, state)
    assert isinstance(report, LoadReport)
    assert report.matched == report.encoder_matched == report.encoder_total == n_enc == len(state)
    assert report.total_target == len(net.state_dict())
    assert report.decoder_matched == 0 and report.missing_encoder == [] and report.unexpected == []
    assert f"loaded {n_enc}/{report.total_target} tensors (encoder {n_enc}/{n_enc}, decoder 0/" in caplog.text
    x = _volume(32)
    with torch.no_grad():
        ours = swin_encoder(x).features
        theirs = net.swinViT(x, True)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b)


def test_swin_export_with_decoder_matches_swinunetr_forward():
    torch.manual_seed(3)
    backbone = SwinBackbone("tiny", with_decoder=True).eval()
    state = backbone.export_state_dict()
    assert not any(k.startswith("out.") for k in state)
    torch.manual_seed(4)
    net = SwinUNETR(in_channels=1, out_channels=2, feature_size=12).eval()
    out_before = {k: v.clone() for k, v in net.state_dict().items() if k.startswith("out.")}
    report = load_pretrained(net, state)
    n_out = len(out_before)
    assert report.matched == report.total_target - n_out == len(state)
    assert report.decoder_matched == report.decoder_total - n_out
    for k, v in out_before.items():  # the task head keeps its own init
        torch.testing.assert_close(net.state_dict()[k], v)
    x = _volume()
    with torch.no_grad():
        ours = net.out(backbone.decode(x, backbone(x)))
        theirs = net(x)
    torch.testing.assert_close(ours, theirs)


def test_vit_export_loads_every_vit_tensor_into_unetr():
    torch.manual_seed(5)
    backbone = ViTBackbone("tiny", img_size=SIDE).eval()
    state = backbone.export_state_dict("unetr")
    assert all(k.startswith("vit.") for k in state)
    assert export_weights(backbone.state_dict()).keys() == state.keys()  # target inferred from keys
    net = UNETR(
        in_channels=1,
        out_channels=2,
        img_size=SIDE,
        hidden_size=192,
        mlp_dim=768,
        num_heads=3,
        feature_size=16,
    ).eval()
    n_vit = _n_prefixed(net, "vit.")
    report = load_pretrained(net, state)
    assert report.matched == report.encoder_matched == report.encoder_total == n_vit == len(state)
    x = _volume()
    with torch.no_grad():
        torch.testing.assert_close(net.vit(x)[0], backbone(x).tokens)


def test_partial_state_raises_with_counts(swin_encoder):
    state = swin_encoder.export_state_dict()
    dropped = [k for k in state if "layers4" in k]
    partial = {k: v for k, v in state.items() if k not in dropped}
    net = SwinUNETR(in_channels=1, out_channels=2, feature_size=12)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    n_enc = _n_prefixed(net, "swinViT.")
    with pytest.raises(ValueError, match=rf"encoder {n_enc - len(dropped)}/{n_enc}") as err:
        load_pretrained(net, partial)
    assert f"{len(dropped)} encoder tensors missing" in str(err.value)
    for k, v in net.state_dict().items():  # nothing was loaded
        torch.testing.assert_close(v, before[k])
    report = load_pretrained(net, partial, require_full_encoder=False)
    assert report.matched == n_enc - len(dropped) and sorted(report.missing_encoder) == sorted(dropped)


def test_shape_mismatch_is_skipped_and_reported(swin_encoder):
    net = SwinUNETR(in_channels=1, out_channels=2, feature_size=24)
    with pytest.raises(ValueError, match="shape mismatches"):
        load_pretrained(net, swin_encoder.export_state_dict())
    report = load_pretrained(net, swin_encoder.export_state_dict(), require_full_encoder=False)
    assert report.shape_mismatches and report.matched + len(report.shape_mismatches) == len(
        swin_encoder.export_state_dict()
    )


class _Method(nn.Module):
    """Stands in for an SSLMethod: student backbone + head, and an EMA teacher."""

    def __init__(self, backbone):
        super().__init__()
        self.student = nn.Module()
        self.student.backbone = backbone
        self.student.head = nn.Linear(4, 4)
        self.teacher = nn.Module()
        self.teacher.backbone = SwinBackbone("tiny")


def test_checkpoint_file_round_trip(tmp_path, swin_encoder):
    method = _Method(swin_encoder)
    assert any(k.startswith(STUDENT_BACKBONE_PREFIX) for k in method.state_dict())
    ckpt = {"method": "fake", "backbone": "swin", "model": method.state_dict(), "epoch": 1}
    path = tmp_path / "ckpt.pt"
    torch.save(ckpt, path)
    exported = export_weights(path, "swinunetr")
    expected = swin_encoder.export_state_dict()
    assert exported.keys() == expected.keys()
    for k, v in expected.items():
        torch.testing.assert_close(exported[k], v)
    with pytest.raises(ValueError, match="unetr"):
        export_weights(path, "unetr")

    saved = save_weights(exported, tmp_path / "sub" / "encoder.pt")
    assert saved.is_file() and [p.name for p in saved.parent.iterdir()] == ["encoder.pt"]
    net = SwinUNETR(in_channels=1, out_channels=2, feature_size=12)
    assert load_pretrained_into(net, str(path)) is net
    assert load_pretrained(net, saved).encoder_matched == _n_prefixed(net, "swinViT.")


def test_load_pretrained_into_scratch_and_bad_path(tmp_path):
    net = SwinUNETR(in_channels=1, out_channels=2, feature_size=12)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    for empty in ("", None):
        assert load_pretrained_into(net, empty) is net
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, before[k])
    missing = tmp_path / "nope.pt"
    with pytest.raises(ValueError, match="nope.pt"):
        load_pretrained_into(net, missing)


def test_default_source_is_what_the_checkpoint_s_method_said():
    model = {"student.backbone.w": torch.ones(1), "teacher.backbone.w": torch.ones(1)}
    assert default_source({"model": model, "export_source": "student"}) == "student"  # DiRA: its query encoder
    assert default_source({"model": model, "export_source": "teacher"}) == "teacher"
    # a checkpoint from before the engine recorded it: the teacher where one is kept
    assert default_source({"model": model}) == "teacher"
    assert default_source({"model": {"student.backbone.w": torch.ones(1)}}) == "student"
