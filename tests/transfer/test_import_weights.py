"""MONAI's published Swin UNETR SSL weights (``model_swinvit.pt`` layout) loaded as ``--pretrained``, counted."""

import logging

import pytest
import torch
from monai.networks.nets import SwinUNETR
from monai.networks.nets.swin_unetr import SwinTransformer
from torch import nn

from medssl3d.transfer.export import (
    LAYOUT_MONAI_SSL,
    export_weights,
    is_monai_ssl_layout,
    load_pretrained,
    load_pretrained_into,
)

FEATURE_SIZE = 12  # tiny; the published file is feature_size 48, same key layout
BOTTLENECK = 16 * FEATURE_SIZE
HEADS = ("contrastive_head", "conv", "rotation_head")


class SSLHeadLike(nn.Module):
    """The module layout of research-contributions' ``SwinUNETR/Pretrain`` SSLHead (its ``vae`` decoder shortened)."""

    def __init__(self):
        super().__init__()
        self.swinViT = SwinTransformer(
            in_chans=1, embed_dim=FEATURE_SIZE, window_size=(7, 7, 7), patch_size=(2, 2, 2), depths=(2, 2, 2, 2),
            num_heads=(3, 6, 12, 24), mlp_ratio=4.0, qkv_bias=True, spatial_dims=3,
        )
        self.rotation_head = nn.Linear(BOTTLENECK, 4)
        self.contrastive_head = nn.Linear(BOTTLENECK, 512)
        self.conv = nn.Sequential(nn.Conv3d(BOTTLENECK, BOTTLENECK // 2, 3, padding=1), nn.InstanceNorm3d(8))


def _published_layout(head: SSLHeadLike) -> dict:
    """``{"state_dict": ...}`` keyed as the published file: ``module.`` + SwinViT keys at the top, MLPs as fc1/fc2."""
    state = {}
    for key, value in head.swinViT.state_dict().items():
        state["module." + key.replace(".mlp.linear1.", ".mlp.fc1.").replace(".mlp.linear2.", ".mlp.fc2.")] = value
    for name in HEADS:
        state.update({f"module.{name}.{k}": v for k, v in getattr(head, name).state_dict().items()})
    return {"state_dict": state}


@pytest.fixture(scope="module")
def ssl_file(tmp_path_factory):
    torch.manual_seed(0)
    head = SSLHeadLike().eval()
    path = tmp_path_factory.mktemp("weights") / "model_swinvit.pt"
    torch.save(_published_layout(head), path)
    return head, path


def test_layout_is_the_one_monai_load_from_reads(ssl_file):
    _, path = ssl_file
    weights = torch.load(path, weights_only=True)
    assert is_monai_ssl_layout(list(weights["state_dict"]))
    SwinUNETR(in_channels=1, out_channels=3, feature_size=FEATURE_SIZE).load_from(weights)  # MONAI's own loader


def test_monai_ssl_weights_load_fully_with_heads_dropped_and_reported(ssl_file, caplog):
    head, path = ssl_file
    torch.manual_seed(1)
    net = SwinUNETR(in_channels=1, out_channels=3, feature_size=FEATURE_SIZE).eval()
    n_encoder = sum(k.startswith("swinViT.") for k in net.state_dict())
    with caplog.at_level(logging.INFO, logger="medssl3d.transfer.export"):
        report = load_pretrained(net, path)
    assert report.layout == LAYOUT_MONAI_SSL
    assert report.matched == report.encoder_matched == report.encoder_total == n_encoder
    assert n_encoder == len(head.swinViT.state_dict())
    assert report.missing_encoder == [] and report.unexpected == [] and report.shape_mismatches == []
    assert report.decoder_matched == 0
    published = _published_layout(head)["state_dict"]
    head_keys = {k for k in published if not k.startswith(("module.patch_embed.", "module.layers"))}
    assert set(report.dropped) == head_keys and len(head_keys) == 6
    assert f"loaded {n_encoder}/{report.total_target} tensors (encoder {n_encoder}/{n_encoder}" in caplog.text
    assert f"6 tensors of its heads {list(HEADS)} dropped" in caplog.text

    reference = SwinUNETR(in_channels=1, out_channels=3, feature_size=FEATURE_SIZE).eval()
    reference.load_from(torch.load(path, weights_only=True))
    ours, theirs = net.swinViT.state_dict(), reference.swinViT.state_dict()
    for key, value in head.swinViT.state_dict().items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=0)
        torch.testing.assert_close(theirs[key], value, rtol=0, atol=0)
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for a, b in zip(net.swinViT(x, True), head.swinViT(x, True), strict=True):
            torch.testing.assert_close(a, b)


def test_bundle_loader_takes_the_file_as_pretrained(ssl_file):
    _, path = ssl_file
    net = SwinUNETR(in_channels=1, out_channels=2, feature_size=FEATURE_SIZE)
    assert load_pretrained_into(net, str(path)) is net


def test_monai_ssl_weights_refuse_another_width_and_unetr(ssl_file):
    _, path = ssl_file
    with pytest.raises(ValueError, match=r"did not load fully.*shape mismatches"):
        load_pretrained(SwinUNETR(in_channels=1, out_channels=2, feature_size=24), path)
    with pytest.raises(ValueError, match="for 'swinunetr', not for target 'unetr'"):
        export_weights(path, target="unetr")
