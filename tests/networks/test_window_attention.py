import copy

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import SwinUNETR
from monai.networks.nets.swin_unetr import PatchMerging, PatchMergingV2, WindowAttention, compute_mask

from medssl3d.networks import window_attention, window_attention_kernels
from medssl3d.networks.backbones import SwinBackbone
from medssl3d.networks.window_attention import (
    FusedBasicLayer,
    FusedSwinTransformerBlock,
    FusedWindowAttention,
    WindowGroups,
    build_window_layout,
    fuse_window_attention,
    grouped_window_attention,
    merge_patches,
)

pytestmark = pytest.mark.usefixtures("one_thread")

WINDOW = (7, 7, 7)
SHIFT = (3, 3, 3)
N = 7**3
GRID = (21, 21, 21)  # 3 windows per axis: every mask pattern, some shared by several windows
WINDOWS = 27
DIM, HEADS = 12, 3
EXACT = {"rtol": 1e-9, "atol": 1e-9}  # float64: the two computations differ by rounding only


def _monai_attention(attn_drop=0.0, dim=DIM):
    torch.manual_seed(0)
    attn = WindowAttention(dim, HEADS, WINDOW, qkv_bias=True, attn_drop=attn_drop).double()
    with torch.no_grad():  # MONAI initialises the table near 0; a visible bias tests its indexing
        attn.relative_position_bias_table.normal_()
    return attn


def _windows(images=2, seed=1, dim=DIM):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(images * WINDOWS, N, dim, generator=g, dtype=torch.float64)


def _shift_mask():
    return compute_mask(list(GRID), WINDOW, SHIFT, None).double()


def _run(module, x, mask):
    """Output, input gradient and parameter gradients for a fixed random cotangent."""
    module.zero_grad()
    x = x.clone().requires_grad_(True)
    y = module(x, mask)
    cotangent = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=y.dtype)
    (y * cotangent).sum().backward()
    return {"out": y.detach(), "x": x.grad, **{n: p.grad for n, p in module.named_parameters()}}


def _assert_same(a, b, **tol):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], **(tol or EXACT), msg=key)


# head width 4 runs the chunked forward, 16 ATen's flash kernel (CHUNKED_FORWARD_MAX_HEAD_DIM)
@pytest.mark.parametrize("dim", [DIM, 4 * DIM], ids=["head_dim_4", "head_dim_16"])
@pytest.mark.parametrize("shifted", [False, True], ids=["no_shift", "shift_mask"])
def test_fused_equals_monai_output_and_gradients(shifted, dim):
    monai = _monai_attention(dim=dim)
    fused = FusedWindowAttention.from_monai(copy.deepcopy(monai))
    mask = _shift_mask() if shifted else None
    x = _windows(dim=dim)
    expected = _run(monai, x, mask)
    _assert_same(_run(fused, x, mask), expected)
    if shifted:  # the grouped mask the fused stages pass gives the same
        _assert_same(_run(fused, x, WindowGroups.from_dense(mask)), expected)


@pytest.mark.parametrize("shifted", [False, True], ids=["no_shift", "shift_mask"])
def test_sdpa_branch_equals_monai_output_and_gradients(shifted, monkeypatch):
    """The branch CUDA and bf16 take (SDPA, the mask needing a gradient), forced on the CPU in float64."""
    masks_needing_grad = []

    def sdpa_branch(qkv, bias, rows, scale):
        masks_needing_grad.append(bias.requires_grad)
        return window_attention_kernels._sdpa_window_attention(qkv, bias, rows, scale)

    monkeypatch.setattr(window_attention, "grouped_window_attention", sdpa_branch)
    monai = _monai_attention()
    fused = FusedWindowAttention.from_monai(copy.deepcopy(monai))
    mask = _shift_mask() if shifted else None
    x = _windows()
    expected = _run(monai, x, mask)
    _assert_same(_run(fused, x, mask), expected)  # qkv and the bias table among the gradients
    assert masks_needing_grad == [True]


def test_backward_in_several_chunks_with_a_partial_last_one(monkeypatch):
    monai = _monai_attention()
    fused = FusedWindowAttention.from_monai(copy.deepcopy(monai))
    # 3 windows per chunk (float64, one thread): the 8 interior windows take chunks of 3, 3 and 2
    monkeypatch.setattr(window_attention_kernels, "BACKWARD_CHUNK_BYTES", 3 * N * N * 8)
    x, mask = _windows(images=1), _shift_mask()
    _assert_same(_run(fused, x, mask), _run(monai, x, mask))


@pytest.mark.parametrize("dim", [DIM, 4 * DIM], ids=["head_dim_4", "head_dim_16"])
def test_inference_path_equals_monai(dim):
    monai = _monai_attention(dim=dim).eval()
    fused = FusedWindowAttention.from_monai(copy.deepcopy(monai))
    x, mask = _windows(images=1, dim=dim), _shift_mask()
    with torch.no_grad():
        torch.testing.assert_close(fused(x, WindowGroups.from_dense(mask)), monai(x, mask), **EXACT)
        torch.testing.assert_close(fused(x, None), monai(x, None), **EXACT)


def test_attention_dropout_falls_back_to_monai():
    monai = _monai_attention(attn_drop=0.5).train()
    fused = FusedWindowAttention.from_monai(copy.deepcopy(monai))
    x, mask = _windows(images=1), _shift_mask()
    outs = []
    for module, m in ((monai, mask), (fused, WindowGroups.from_dense(mask))):
        torch.manual_seed(3)
        outs.append(module(x, m))
    torch.testing.assert_close(outs[1], outs[0], **EXACT)


@pytest.mark.parametrize(
    "attention",
    [grouped_window_attention, window_attention_kernels._sdpa_window_attention],
    ids=["dispatch", "sdpa_branch"],
)
def test_grouped_attention_equals_plain_attention_per_group(attention):
    g = torch.Generator().manual_seed(0)
    rows, heads, n, d = (3, 1, 2), 2, 9, 4
    qkv = torch.randn(sum(rows), n, 3, heads, d, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(len(rows), heads, n, n, generator=g, dtype=torch.float64)
    bias[1, :, 0, 1:] = float("-inf")  # a row masked but for one key
    bias.requires_grad_(True)

    def plain(qkv, bias):
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        group = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(rows))
        attn = torch.softmax(q @ k.transpose(-1, -2) * 0.5 + bias[group], -1)
        return (attn @ v).transpose(1, 2)

    results = []
    for fn in (plain, lambda qkv, bias: attention(qkv, bias, rows, 0.5)):
        out = fn(qkv, bias)
        results.append((out, *torch.autograd.grad(out.pow(2).sum(), (qkv, bias))))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a, **EXACT)


def test_grouped_attention_rejects_rows_that_do_not_fit():
    qkv, bias = torch.zeros(6, 9, 3, 2, 4), torch.zeros(3, 2, 9, 9)
    with pytest.raises(ValueError, match="rows"):
        grouped_window_attention(qkv, bias, (3, 3), 0.5)


def test_window_groups_of_a_shift_mask():
    mask = _shift_mask()
    groups = WindowGroups.from_dense(mask)
    # a window's pattern depends on whether it is the last along each axis: 2**3 patterns;
    # 2 of 3 windows per axis are not last, so the interior group has 2**3 windows
    assert groups.num_windows == WINDOWS
    assert sorted(groups.counts) == [1, 2, 2, 2, 4, 4, 4, 8]
    assert sorted(groups.order.tolist()) == list(range(WINDOWS))
    rebuilt = window_attention._dense(groups)
    assert torch.equal(rebuilt.isinf(), mask != 0)
    assert torch.all(rebuilt[mask == 0] == 0)
    order, rows = groups.batch_order(2)  # group-major over two images
    assert rows == tuple(2 * c for c in groups.counts)
    first = groups.order[: groups.counts[0]]
    assert order[: rows[0]].tolist() == first.tolist() + (first + WINDOWS).tolist()


@pytest.mark.parametrize("shift", [(0, 0, 0), (1, 1, 1)])
def test_window_layout_reproduces_pad_roll_and_partition(shift):
    from monai.networks.nets.swin_unetr import window_partition, window_reverse

    batch, spatial, window = 2, (5, 4, 6), (3, 3, 3)  # padded to (6, 6, 6): 8 windows of 27
    x = torch.randn(batch, *spatial, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    padded = F.pad(x, (0, 0, 0, 0, 0, 2, 0, 1))
    rolled = torch.roll(padded, [-s for s in shift], dims=(1, 2, 3))
    expected = window_partition(rolled, window)  # (batch * 8, 27, 2), image-major
    layout = build_window_layout(batch, spatial, window, shift)
    windows = window_attention._to_windows(x.reshape(-1, 2), layout).view(-1, 27, 2)
    if any(shift):
        order, rows = WindowGroups.from_dense(compute_mask([6, 6, 6], window, shift, None)).batch_order(batch)
        assert layout.rows == rows and layout.masks.shape == (len(rows), 27, 27)
        expected = expected[order]
    else:
        assert layout.rows == (batch * 8,) and layout.masks is None
    torch.testing.assert_close(windows, expected, rtol=0, atol=0)
    back = window_attention._from_windows(windows.reshape(-1, 2), layout).view_as(x)
    torch.testing.assert_close(back, x, rtol=0, atol=0)
    # and back the way MONAI goes: reverse the windows, roll back, crop
    unrolled = torch.roll(window_reverse(window_partition(rolled, window), window, [batch, 6, 6, 6]), shift, (1, 2, 3))
    torch.testing.assert_close(unrolled[:, :5, :4, :6], x, rtol=0, atol=0)


def test_state_dict_unchanged_and_exports_into_monai_swinunetr():
    torch.manual_seed(0)
    plain = SwinBackbone("tiny", fused_attention=False)
    fused = SwinBackbone("tiny")
    assert list(fused.state_dict()) == list(plain.state_dict())
    assert sum(isinstance(m, FusedWindowAttention) for m in fused.modules()) == 8
    assert not any(isinstance(m, FusedWindowAttention) for m in plain.modules())
    target = SwinUNETR(in_channels=1, out_channels=2, feature_size=12)
    missing, unexpected = target.load_state_dict(fused.export_state_dict("swinunetr"), strict=False)
    assert not unexpected
    assert not [k for k in missing if k.startswith("swinViT.")]


def test_backbone_forward_and_gradients_equal_before_and_after_swap():
    torch.manual_seed(0)
    before = SwinBackbone("tiny", fused_attention=False).double()
    for name, p in before.named_parameters():
        if name.endswith("relative_position_bias_table"):
            p.data.normal_()
    after = copy.deepcopy(before)
    assert fuse_window_attention(after.net) == 8
    assert fuse_window_attention(after.net) == 0  # already fused
    x = torch.randn(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    results = []
    for net in (before, after):
        out = net(x)
        loss = sum(f.pow(2).mean() for f in out.features)
        loss.backward()
        results.append({"tokens": out.tokens.detach(), **{n: p.grad for n, p in net.named_parameters()}})
    _assert_same(results[1], results[0])


def test_stage_caches_one_layout_per_shape():
    net = SwinBackbone("tiny")
    layer = net.net.swinViT.layers1[0]
    assert isinstance(layer, FusedBasicLayer)
    assert all(isinstance(b, FusedSwinTransformerBlock) for b in layer.blocks)
    cpu = torch.device("cpu")
    first = layer.layouts.get(1, (4, 4, 4), (2, 2, 2), (1, 1, 1), cpu)
    assert layer.layouts.get(1, (4, 4, 4), (2, 2, 2), (1, 1, 1), cpu) is first
    for i in range(window_attention.LAYOUT_CACHE_SIZE + 2):
        layer.layouts.get(1, (4, 4, 2 * (i + 2)), (2, 2, 2), (1, 1, 1), cpu)
    assert len(layer.layouts) == window_attention.LAYOUT_CACHE_SIZE


def test_stages_with_attention_dropout_stay_monai():
    swin = SwinUNETR(in_channels=1, out_channels=1, feature_size=12, attn_drop_rate=0.1).swinViT
    assert fuse_window_attention(swin) == 0
    assert not any(isinstance(m, (FusedBasicLayer, FusedWindowAttention)) for m in swin.modules())


@pytest.mark.parametrize("merging_cls", [PatchMerging, PatchMergingV2])
@pytest.mark.parametrize("shape", [(2, 4, 6, 2, 3), (1, 3, 4, 5, 3)], ids=["even", "odd"])
def test_merge_patches_equals_monai(merging_cls, shape):
    torch.manual_seed(0)
    merging = merging_cls(dim=shape[-1]).double()
    with torch.no_grad():  # non-trivial affine LayerNorm, so a permuted weight would show
        merging.norm.weight.normal_()
        merging.norm.bias.normal_()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    results = []
    for fn in (merging, lambda t: merge_patches(merging, t)):
        merging.zero_grad()
        xx = x.clone().requires_grad_(True)
        y = fn(xx)
        y.pow(2).sum().backward()
        results.append({"out": y.detach(), "x": xx.grad, **{n: p.grad for n, p in merging.named_parameters()}})
    _assert_same(results[1], results[0])
