import pytest
import torch
from monai.networks.nets.swin_unetr import WindowAttention

from medssl3d.bundle_support.smoke_data import write_smoke_datalist
from medssl3d.jobs.pretrain import PretrainRequest, pretrain_job
from medssl3d.methods import build_method
from medssl3d.networks.backbones import (
    BACKBONE_SIZES,
    BACKBONES,
    BackboneOutput,
    SwinBackbone,
    ViTBackbone,
    build_backbone,
)
from medssl3d.networks.window_attention import FusedWindowAttention

SIDE = 64


def _volume(side=SIDE, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, side, side, side, generator=g)


@pytest.fixture(scope="module")
def swin():
    torch.manual_seed(0)
    return SwinBackbone("tiny", with_decoder=True).eval()


@pytest.fixture(scope="module")
def swin_out(swin):
    x = _volume()
    with torch.no_grad():
        return x, swin(x)


def test_swin_tiny_shapes_and_strides(swin, swin_out):
    _, out = swin_out
    assert isinstance(out, BackboneOutput)
    assert out.strides == (2, 4, 8, 16, 32)
    assert swin.patch_stride == 32 and swin.embed_dim == 12 * 16
    for i, (f, s) in enumerate(zip(out.features, out.strides, strict=True)):
        assert f.shape == (1, 12 * 2**i, SIDE // s, SIDE // s, SIDE // s)
    n = (SIDE // 32) ** 3
    assert out.tokens.shape == (1, n, swin.embed_dim)


def test_swin_tokens_are_last_map_in_zyx_raster_order(swin_out):
    _, out = swin_out
    last = out.features[-1]
    side = last.shape[-1]
    for z, y, x in [(0, 0, 1), (0, 1, 0), (1, 0, 0), (1, 1, 1)]:
        torch.testing.assert_close(out.tokens[0, z * side * side + y * side + x], last[0, :, z, y, x])


def test_swin_decode_shape(swin, swin_out):
    x, out = swin_out
    with torch.no_grad():
        y = swin.decode(x, out)
    assert y.shape == (1, swin.decoder_channels, SIDE, SIDE, SIDE)
    assert swin.decoder_channels == 12


def test_swin_without_decoder_has_encoder_params_only():
    net = SwinBackbone("tiny")
    prefixes = {k.split(".")[1] for k in net.state_dict()}
    assert prefixes == {"swinViT"}
    with pytest.raises(RuntimeError, match="with_decoder"):
        net.decode(_volume(32), net(_volume(32)))


@pytest.mark.parametrize("shape", [(1, 1, 64, 64, 48), (1, 1, 33, 64, 64)])
def test_swin_rejects_sizes_not_divisible_by_32(shape):
    net = SwinBackbone("tiny")
    with pytest.raises(ValueError, match=str(tuple(shape[2:])).replace("(", r"\(").replace(")", r"\)")):
        net(torch.zeros(shape))


def test_swin_rejects_wrong_channels():
    with pytest.raises(ValueError, match=r"\(1, 2, 32, 32, 32\)"):
        SwinBackbone("tiny")(torch.zeros(1, 2, 32, 32, 32))


def test_swin_checkpointing_same_output_and_grads():
    torch.manual_seed(0)
    plain = SwinBackbone("tiny")
    ckpt = SwinBackbone("tiny", use_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    x = _volume(32)
    results = []
    for net in (plain, ckpt):
        out = net(x)
        loss = out.tokens.pow(2).mean() + sum(f.mean() for f in out.features)
        loss.backward()
        results.append((out.tokens.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0])
    assert results[0][1].keys() == results[1][1].keys()
    for name, g in results[0][1].items():
        torch.testing.assert_close(g, results[1][1][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return ViTBackbone("tiny", img_size=SIDE).eval()


def test_vit_tiny_shapes_and_strides(vit):
    x = _volume()
    with torch.no_grad():
        out = vit(x)
    g = SIDE // 16
    assert out.strides == (16,)
    assert vit.patch_stride == 16 and vit.embed_dim == 192
    assert out.tokens.shape == (1, g**3, 192)
    assert len(out.features) == 1 and out.features[0].shape == (1, 192, g, g, g)
    assert len(out.hidden_states) == 12
    assert all(h.shape == (1, g**3, 192) for h in out.hidden_states)
    torch.testing.assert_close(out.tokens, out.features[0].flatten(2).transpose(1, 2))


def test_vit_token_order_follows_the_zyx_grid(vit):
    # a bright patch at grid cell (R, A, S) = (1, 2, 3) changes the patch embedding of token
    # z*16 + y*4 + x only (before the transformer mixes tokens)
    x = torch.zeros(1, 1, SIDE, SIDE, SIDE)
    x[..., 16:32, 32:48, 48:64] = 1.0
    with torch.no_grad():
        emb = vit.net.patch_embedding(x) - vit.net.patch_embedding(torch.zeros_like(x))
    changed = emb.abs().sum(-1).nonzero()[:, 1].tolist()
    assert changed == [1 * 16 + 2 * 4 + 3]


def test_vit_pos_embed_is_frozen_sincos(vit):
    pos = vit.net.patch_embedding.position_embeddings
    assert not pos.requires_grad
    assert pos.abs().sum() > 0


def test_vit_rejects_other_sizes(vit):
    with pytest.raises(ValueError, match=r"\(32, 64, 64\)"):
        vit(torch.zeros(1, 1, 32, 64, 64))
    with pytest.raises(ValueError, match="divisible"):
        ViTBackbone("tiny", img_size=(64, 64, 40))


def test_registry_and_sizes():
    assert set(BACKBONES) == {"swin", "vit"}
    assert {s.feature_size for s in BACKBONE_SIZES["swin"].values()} == {12, 24, 48}
    base = BACKBONE_SIZES["vit"]["base"]
    assert (base.hidden_size, base.num_heads, base.mlp_dim, base.num_layers) == (768, 12, 3072, 12)
    net = build_backbone("swin", size="tiny")
    assert isinstance(net, SwinBackbone) and net.feature_size == 12
    with pytest.raises(ValueError, match="resnet"):
        build_backbone("resnet")
    with pytest.raises(ValueError, match="huge"):
        build_backbone("vit", size="huge")


def test_export_target_is_checked(vit):
    with pytest.raises(ValueError, match="swinunetr"):
        vit.export_state_dict("swinunetr")


def test_swin_fused_attention_matches_plain_at_inference():
    torch.manual_seed(0)
    plain = SwinBackbone("tiny").eval()
    fused = SwinBackbone("tiny", use_flash_attention=True).eval()
    fused.load_state_dict(plain.state_dict())
    x = _volume(32)
    with torch.no_grad():
        torch.testing.assert_close(fused(x).tokens, plain(x).tokens, rtol=1e-4, atol=1e-4)


def test_decode_stages_end_with_decode_and_stop_early():
    torch.manual_seed(0)
    backbone = SwinBackbone(size="tiny", with_decoder=True).eval()
    x = torch.randn(1, 1, 64, 64, 64)
    with torch.no_grad():
        out = backbone(x)
        stages = backbone.decode_stages(x, out)
        assert [s.shape[-1] for s in stages] == [4, 8, 16, 32, 64]
        assert [s.shape[1] for s in stages] == [96, 48, 24, 12, 12]
        torch.testing.assert_close(stages[-1], backbone.decode(x, out))
        torch.testing.assert_close(backbone.decode_stages(x, out, num_stages=1)[0], stages[0])
    with pytest.raises(ValueError, match="num_stages"):
        backbone.decode_stages(x, out, num_stages=6)


def _attention_kinds(module):
    """The window-attention classes of every Swin block under ``module`` (MONAI's or the fused one)."""
    return {type(m) for m in module.modules() if isinstance(m, WindowAttention)}


@pytest.mark.parametrize("method", ["swin_ssl", "alice", "dira", "ace"])
@pytest.mark.parametrize("fused", [True, False])
def test_fused_attention_switch_reaches_the_backbone_from_a_method_config(method, fused):
    model = build_method(method, backbone_size="tiny", fused_attention=fused)
    assert _attention_kinds(model) == {FusedWindowAttention if fused else WindowAttention}


@pytest.mark.parametrize("method", ["swin_ssl", "alice", "dira", "ace"])
@pytest.mark.parametrize("fused", [True, False])
def test_fused_attention_switch_reaches_the_backbone_from_a_bundle(method, fused, tmp_path):
    """``medssl3d pretrain <method> --set fused_attention=false``: the bundle's top-level id reaches the backbone."""
    datalist = write_smoke_datalist(tmp_path / "data", n_train=1, n_val=0, shape=(32, 32, 32))
    overrides = (*(() if fused else ("fused_attention=false",)),
                 *(("correspondence=body_box",) if method == "alice" else ()))
    request = PretrainRequest(method, str(datalist), out=str(tmp_path / "run"), size="tiny", overrides=overrides)
    model = pretrain_job(request, datalist, distributed=False).resolve(["method"])["method"]
    assert _attention_kinds(model) == {FusedWindowAttention if fused else WindowAttention}
