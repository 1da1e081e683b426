import pytest
import torch

from medssl3d.bundle_support.networks import build_segmentation_network, network_widths


@pytest.mark.parametrize(("arch", "size", "want"), [
    ("swinunetr", "tiny", {"feature_size": 12}),
    ("swinunetr", "small", {"feature_size": 24}),
    ("swinunetr", "base", {"feature_size": 48}),
    ("unetr", "tiny", {"feature_size": 16, "vit_hidden_size": 192, "vit_mlp_dim": 768, "vit_num_heads": 3}),
    ("unetr", "small", {"feature_size": 16, "vit_hidden_size": 384, "vit_mlp_dim": 1536, "vit_num_heads": 6}),
    ("unetr", "base", {"feature_size": 16, "vit_hidden_size": 768, "vit_mlp_dim": 3072, "vit_num_heads": 12}),
])
def test_widths_of_a_named_size(arch, size, want):
    widths = network_widths(arch, size)
    assert {k: widths[k] for k in want} == want


def test_the_widths_build_the_network_an_encoder_of_that_size_fits():
    net = build_segmentation_network("swinunetr", in_channels=1, out_channels=2, **network_widths("swinunetr", "tiny"))
    assert net.swinViT.patch_embed.proj.weight.shape[0] == 12
    vit = build_segmentation_network("unetr", in_channels=1, out_channels=2, img_size=(32, 32, 32),
                                     **network_widths("unetr", "small"))
    assert vit.vit.patch_embedding.position_embeddings.shape[-1] == 384
    assert vit(torch.zeros(1, 1, 32, 32, 32)).shape == (1, 2, 32, 32, 32)


@pytest.mark.parametrize(("arch", "size", "message"), [
    ("unetr", "huge", "backbone_size for unetr .*'huge'"),
    ("swinunetr", "huge", "'huge'"),
    ("unet", "tiny", "arch='unet'"),
])
def test_unknown_arch_or_size_is_refused(arch, size, message):
    with pytest.raises(ValueError, match=message):
        network_widths(arch, size)


def test_fused_swinunetr_keeps_monai_keys_outputs_and_gradients():
    """The fused network loads MONAI's state dict as is and computes the same logits and gradients."""
    from monai.data import MetaTensor, list_data_collate
    from monai.networks.nets.swin_unetr import WindowAttention

    from medssl3d.networks.window_attention import FusedWindowAttention

    torch.manual_seed(0)
    kwargs = {"in_channels": 1, "out_channels": 3, **network_widths("swinunetr", "tiny")}
    plain = build_segmentation_network("swinunetr", fused_attention=False, **kwargs)
    fused = build_segmentation_network("swinunetr", **kwargs)
    assert list(plain.state_dict()) == list(fused.state_dict())
    fused.load_state_dict(plain.state_dict())
    kinds = lambda net: {type(m) for m in net.modules() if isinstance(m, WindowAttention)}  # noqa: E731
    assert kinds(plain) == {WindowAttention} and kinds(fused) == {FusedWindowAttention}
    # a crop whose sides are not all equal (shifted windows pad differently along each axis), as the MetaTensor
    # MONAI's loaders hand the bundle
    x = list_data_collate([MetaTensor(torch.randn(1, 64, 32, 64))])
    assert isinstance(x, MetaTensor) and x.is_batch
    outs = []
    for net in (plain, fused):
        y = net(x)
        y.square().mean().backward()
        outs.append((y.detach(), net.swinViT.patch_embed.proj.weight.grad.clone()))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-3, atol=1e-6)
