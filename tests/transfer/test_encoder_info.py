"""Encoders that describe themselves: saved description, bundle settings read from it, mismatches refused."""

import logging
from types import SimpleNamespace

import pytest
import torch
from monai.networks.nets import SwinUNETR

from medssl3d.data.presets import preset_for
from medssl3d.transfer.encoder_info import (
    describe_encoder,
    encoder_run_info,
    encoder_setting,
    export_encoder,
    fitting_encoder,
    read_encoder_info,
    save_encoder,
)
from medssl3d.transfer.export import export_weights, load_pretrained, save_weights


def _info(steps=300, source="teacher", **kw):
    args = dict(method="alice", export_target="swinunetr", backbone_size="tiny", roi_size=(64, 64, 64),
                preset=preset_for("mri", 2.0))
    return describe_encoder(encoder_run_info(**{**args, **kw}), steps=steps, source=source)


@pytest.fixture()
def encoder(tmp_path):
    torch.manual_seed(0)
    weights = export_weights(SwinUNETR(in_channels=1, out_channels=2, feature_size=12).state_dict(), "swinunetr")
    return save_encoder(weights, tmp_path / "enc.pt", _info()), weights


def test_description_round_trips_and_names_everything(encoder):
    path, weights = encoder
    info = read_encoder_info(path)
    assert info == _info()
    assert info["width"]["feature_size"] == 12 and info["preset"]["modality"] == "mri"
    assert info["preset"]["spacing"] == [2.0, 2.0, 2.0] and info["preset"]["scaling"] == "percentile"
    assert {"method", "backbone_size", "roi_size", "steps", "source", "medssl3d_version"} <= set(info)
    # the tensors load like a plain exported file, counted
    net = SwinUNETR(in_channels=1, out_channels=3, feature_size=12)
    assert load_pretrained(net, path).encoder_matched == len(
        [k for k in net.state_dict() if k.startswith("swinViT.")])
    torch.testing.assert_close(net.state_dict()["swinViT.patch_embed.proj.weight"],
                               weights["swinViT.patch_embed.proj.weight"])


def test_plain_state_dict_and_scratch_have_no_description(tmp_path, encoder):
    plain = save_weights(encoder[1], tmp_path / "plain.pt")
    assert read_encoder_info(plain) is None and read_encoder_info("") is None
    assert encoder_setting(None, "feature_size", 48) == 48
    with pytest.raises(ValueError, match="does not exist"):
        read_encoder_info(tmp_path / "missing.pt")


def test_bundle_settings_come_from_the_description():
    info = _info()
    assert encoder_setting(info, "feature_size", 48) == 12
    assert encoder_setting(info, "modality", "ct") == "mri"
    assert encoder_setting(info, "spacing_mm", None) == [2.0, 2.0, 2.0]
    assert encoder_setting(info, "roi_size", [96] * 3) == [64, 64, 64]
    assert encoder_setting(info, "arch", "unetr") == "swinunetr"
    assert encoder_setting(info, "backbone_size", "base") == "tiny"
    assert encoder_setting(info, "vit_hidden_size", 768) == 768  # a Swin encoder has no ViT width
    vit = _info(export_target="unetr", backbone_size="small")
    assert encoder_setting(vit, "vit_hidden_size", 768) == 384 and encoder_setting(vit, "vit_num_heads", 12) == 6
    with pytest.raises(ValueError, match="'depth'"):
        encoder_setting(info, "depth", 1)


SETTINGS = dict(arch="swinunetr", feature_size=12, vit_hidden_size=768, modality="mri", spacing_mm=None,
                roi_size=[64, 64, 64])


@pytest.mark.parametrize(("change", "message"), [
    ({"feature_size": 48}, "feature_size=12 .*feature_size=48"),
    ({"modality": "ct"}, "modality='mri' .*modality='ct'"),
    ({"arch": "unetr"}, "arch='swinunetr' .*arch='unetr'"),
    ({"backbone_size": "small", "feature_size": 24}, "backbone_size='tiny' .*backbone_size='small'"),
])
def test_mismatch_is_refused_in_one_line_naming_both_values(encoder, change, message):
    path = encoder[0]
    with pytest.raises(ValueError, match=message) as err:
        fitting_encoder(path, read_encoder_info(path), **{**SETTINGS, **change})
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_other_crop_or_spacing_is_allowed_with_a_warning(encoder, caplog):
    path = encoder[0]
    with caplog.at_level(logging.WARNING):
        assert fitting_encoder(path, read_encoder_info(path), **SETTINGS) == path
        assert not caplog.records
        fitting_encoder(path, read_encoder_info(path), **{**SETTINGS, "spacing_mm": 1.5, "roi_size": [96] * 3})
    text = caplog.text
    assert "spacing_mm=[2.0, 2.0, 2.0]" in text and "roi_size=[64, 64, 64]" in text


def test_describe_refuses_unknown_values():
    with pytest.raises(ValueError, match="'huge'"):
        _info(backbone_size="huge")
    with pytest.raises(ValueError, match="'ema'"):
        _info(source="ema")
    with pytest.raises(ValueError, match="'resnet'"):
        _info(export_target="resnet")
    with pytest.raises(ValueError, match="encoder_run_info"):
        describe_encoder({"method": "alice"}, steps=1, source="student")


class _TeacherMethod:
    def default_export_source(self):
        return "teacher"

    def export_state_dict(self, target, source):
        return {"swinViT.patch_embed.proj.weight": torch.full((2, 2), 1.0 if source == "teacher" else 2.0)}


@pytest.mark.parametrize(("share", "warned"), [(0.67, True), (0.02, False)])
def test_an_exported_teacher_says_how_much_of_its_start_it_still_holds(tmp_path, caplog, share, warned):
    run_info = encoder_run_info(method="alice", export_target="swinunetr", backbone_size="tiny",
                                roi_size=(64, 64, 64), preset=preset_for("mri", 2.0))
    trainer = SimpleNamespace(method=_TeacherMethod(), run_info=run_info, step=200, teacher_start_share=lambda: share)
    with caplog.at_level(logging.WARNING, logger="medssl3d.transfer.encoder_info"):
        teacher = export_encoder(trainer, tmp_path / "teacher.pt", target="swinunetr")
    info = read_encoder_info(teacher)
    assert (info["source"], info["teacher_start_share"]) == ("teacher", share)
    assert ("67 % of its weight to its initial" in caplog.text) is warned
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medssl3d.transfer.encoder_info"):
        student = export_encoder(trainer, tmp_path / "student.pt", target="swinunetr", source="student")
    assert "teacher_start_share" not in read_encoder_info(student) and caplog.text == ""
