"""CPU kernels of the fused Swin window attention: forward and backward over groups of windows sharing one mask.

The forward runs ATen's fused (flash) kernel per group, or, for narrow heads, a chunked loop over
windows; the backward recomputes the attention probabilities in cache-sized chunks of windows, as
FlashAttention does, and returns the gradient of the additive mask too. On CUDA and in bf16,
:func:`grouped_window_attention` runs ``scaled_dot_product_attention`` per group instead.
:mod:`medssl3d.networks.window_attention` builds the Swin modules on top of it.

Dao et al., "FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness", NeurIPS 2022.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["grouped_window_attention"]

BACKWARD_CHUNK_BYTES = 2**20
"""Bytes per thread of each of the two ``(windows, n, n)`` blocks the backward recomputes (about L2)."""
LOG2E = math.log2(math.e)
CHUNKED_FORWARD_MAX_HEAD_DIM = 8
"""Head width up to which the CPU forward runs chunked in Python, not ATen's flash kernel: at width 4
(Swin ``tiny``) it is 1.5x faster, at 16 (``base``) flash is a little faster."""
CPU_FUSED_DTYPES = (torch.float32, torch.float64)
"""dtypes of the CPU kernel with the bias gradient; others (bf16 autocast) go through SDPA."""


# --------------------------------------------------------------------------------------
# The attention kernel.
# --------------------------------------------------------------------------------------
def _split_qkv(qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(B, n, 3, heads, d)`` -> q, k, v as ``(B, heads, n, d)`` views."""
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


class _GroupedFlashAttention(torch.autograd.Function):
    """Window attention on the CPU over groups of windows sharing one additive mask, with its gradient.

    Forward: ATen's CPU flash kernel per group (no ``n x n`` tensor kept). Backward: the
    probabilities are recomputed from the saved log-sum-exp in chunks of windows, as
    FlashAttention does, and the gradient of the mask is summed over the windows of each group.
    """

    @staticmethod
    def forward(ctx, qkv: Tensor, bias: Tensor, rows: tuple[int, ...], scale: float) -> Tensor:
        out, lse = _grouped_forward(qkv, bias, rows, scale)
        ctx.save_for_backward(qkv, bias, out, lse)
        ctx.rows, ctx.scale = rows, scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        qkv, bias, out, lse = ctx.saved_tensors
        b, n, _, h, d = qkv.shape
        grad_qkv = torch.empty_like(qkv)
        grad_bias = torch.zeros_like(bias) if ctx.needs_input_grad[1] else None
        buffers = _work_buffers(qkv, ctx.rows, 2)
        start = 0
        for g, count in enumerate(ctx.rows):
            part = slice(start, start + count)
            grads = _group_backward(
                _split_qkv(qkv[part]),
                bias[g],
                out[part],
                lse[part],
                grad_out[part],
                ctx.scale,
                buffers,
                None if grad_bias is None else grad_bias[g],
            )
            for i, grad in enumerate(grads):  # (heads, count, d, n) -> (count, n, heads, d)
                grad_qkv[part, :, i] = grad.permute(1, 3, 0, 2)
            start += count
        return grad_qkv, grad_bias, None, None


def _work_buffers(qkv: Tensor, rows: tuple[int, ...], count: int) -> tuple[Tensor, ...]:
    """``count`` work tensors ``(chunk, n, n)``: one L2-sized block per thread, at most a group."""
    n = qkv.shape[1]
    chunk = max(1, BACKWARD_CHUNK_BYTES * torch.get_num_threads() // (n * n * qkv.element_size()))
    chunk = min(chunk, max(rows))
    return tuple(qkv.new_empty((chunk, n, n)) for _ in range(count))


def _grouped_forward(qkv: Tensor, bias: Tensor, rows: tuple[int, ...], scale: float) -> tuple[Tensor, Tensor]:
    """Output ``(B, n, heads, d)`` and log-sum-exp ``(B, heads, n)`` of every group, on the CPU."""
    b, n, _, h, d = qkv.shape
    out = qkv.new_empty((b, n, h, d))
    lse = qkv.new_empty((b, h, n))
    chunked = d <= CHUNKED_FORWARD_MAX_HEAD_DIM
    buffers = _work_buffers(qkv, rows, 1) if chunked else ()
    start = 0
    for g, count in enumerate(rows):
        part = slice(start, start + count)
        q, k, v = _split_qkv(qkv[part])
        if chunked:
            out[part], lse[part] = _chunked_forward(q, k, v, bias[g], scale, buffers[0])
        else:
            o, lse[part] = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, attn_mask=bias[g : g + 1], scale=scale
            )
            out[part] = o.transpose(1, 2)
        start += count
    return out, lse


def _chunked_forward(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float, buffer: Tensor
) -> tuple[Tensor, Tensor]:
    """``softmax(scale · q kᵀ + bias) v`` of one group in cache-sized chunks of windows.

    Args:
        q: ``(B, heads, n, d)``; ``k``, ``v`` the same.
        k: keys.
        v: values.
        bias: ``(heads, n, n)``.
        scale: multiplies ``q kᵀ``.
        buffer: a ``(chunk, n, n)`` work tensor.

    Returns:
        The output as a ``(B, n, heads, d)`` view and the log-sum-exp ``(B, heads, n)`` (natural log).
    """
    count, h, n, d = q.shape
    # layouts and exp2 as in _group_backward
    q_hb = q.transpose(0, 1).contiguous()
    k_t, v_t = (t.permute(1, 0, 3, 2).contiguous() for t in (k, v))
    out_t = q.new_empty((h, count, d, n))
    lse = q.new_empty((h, count, n, 1))
    chunk = buffer.shape[0]
    for head in range(h):
        bias_head = (bias[head] * LOG2E).expand(chunk, n, n)
        for start in range(0, count, chunk):
            c = min(chunk, count - start)
            w = (head, slice(start, start + c))
            s = torch.baddbmm(bias_head[:c], q_hb[w], k_t[w], alpha=scale * LOG2E, out=buffer[:c])
            row_max = s.amax(-1, keepdim=True)
            p = s.sub_(row_max).exp2_()
            row_sum = p.sum(-1, keepdim=True)
            torch.bmm(v_t[w], p.transpose(1, 2), out=out_t[w])
            out_t[w].div_(row_sum.transpose(1, 2))
            lse[w] = row_max + row_sum.log2_()
    return out_t.permute(1, 3, 0, 2), lse.squeeze(-1).transpose(0, 1) / LOG2E


def _group_backward(
    qkv: tuple[Tensor, Tensor, Tensor],
    bias: Tensor,
    out: Tensor,
    lse: Tensor,
    grad_out: Tensor,
    scale: float,
    buffers: tuple[Tensor, Tensor],
    grad_bias: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of q, k, v (transposed, ``(heads, B, d, n)``) of one group; adds the mask's into ``grad_bias``.

    Args:
        qkv: q, k, v ``(B, heads, n, d)``.
        bias: the group's additive mask ``(heads, n, n)``.
        out: the forward's output ``(B, n, heads, d)``; ``grad_out`` its gradient.
        lse: the forward's log-sum-exp ``(B, heads, n)``.
        grad_out: ``(B, n, heads, d)``.
        scale: the forward's scale.
        buffers: two ``(chunk, n, n)`` work tensors.
        grad_bias: ``(heads, n, n)`` accumulator, or None.
    """
    q, k, v = qkv
    count, h, n, _ = q.shape
    # head-major copies (heads, B, ...), so that a chunk of windows shares one mask row; the
    # (d, n) ones because a product with an (n, n) operand is 4-6x faster in MKL with the
    # skinny operand on the left (d x n @ n x n) than on the right, so gradients come transposed
    q_hb = q.transpose(0, 1).contiguous()
    grad_out_hb = grad_out.permute(2, 0, 1, 3).contiguous()
    q_t, k_t, v_t = (t.permute(1, 0, 3, 2).contiguous() for t in (q, k, v))
    grad_out_t = grad_out.permute(2, 0, 3, 1).contiguous()
    # D_i = sum_j P_ij dP_ij = <dO_i, O_i>: the softmax-backward row term, without P
    delta = (grad_out * out).sum(-1).permute(2, 0, 1).unsqueeze(-1)
    # exp(x) as exp2(x · log2 e): ATen's exp2 is several times faster than its exp on CPUs
    lse = lse.transpose(0, 1).unsqueeze(-1) * LOG2E
    grad_q_t, grad_k_t, grad_v_t = (torch.empty_like(q_t) for _ in range(3))
    chunk = buffers[0].shape[0]
    for head in range(h):
        bias_head = (bias[head] * LOG2E).expand(chunk, n, n)
        for start in range(0, count, chunk):
            c = min(chunk, count - start)
            w = (head, slice(start, start + c))
            s, ds = buffers[0][:c], buffers[1][:c]
            torch.baddbmm(bias_head[:c], q_hb[w], k_t[w], alpha=scale * LOG2E, out=s)
            p = s.sub_(lse[w]).exp2_()
            torch.bmm(grad_out_hb[w], v_t[w], out=ds)
            ds.sub_(delta[w]).mul_(p)
            torch.bmm(grad_out_t[w], p, out=grad_v_t[w])
            torch.bmm(k_t[w], ds.transpose(1, 2), out=grad_q_t[w])
            torch.bmm(q_t[w], ds, out=grad_k_t[w])
            if grad_bias is not None:
                grad_bias[head] += ds.sum(0)
    return grad_q_t.mul_(scale), grad_k_t.mul_(scale), grad_v_t


@torch.compiler.disable  # Python loops over windows: torch.compile would unroll them
def grouped_window_attention(qkv: Tensor, bias: Tensor, rows: Sequence[int], scale: float) -> Tensor:
    """``softmax(scale · q kᵀ + bias_g) v`` for consecutive groups of windows, each with its own mask.

    Args:
        qkv: ``(B, n, 3, heads, d)``, MONAI's ``qkv`` projection of ``B`` windows of ``n`` tokens.
        bias: ``(G, heads, n, n)`` additive masks, one per group; may require grad.
        rows: windows per group (G numbers summing to B): group ``g`` is the next ``rows[g]`` windows.
        scale: multiplies ``q kᵀ``.

    Returns:
        ``(B, n, heads, d)``, equal to the plain computation; gradients flow to ``qkv`` and ``bias``.
    """
    rows = tuple(int(r) for r in rows)
    if sum(rows) != qkv.shape[0] or len(rows) != bias.shape[0]:
        raise ValueError(f"rows {rows} must sum to {qkv.shape[0]} windows and count {bias.shape[0]} masks")
    bias = bias.to(qkv.dtype)
    cpu_kernel = qkv.device.type == "cpu" and qkv.dtype in CPU_FUSED_DTYPES
    if cpu_kernel and torch.is_grad_enabled() and (qkv.requires_grad or bias.requires_grad):
        return _GroupedFlashAttention.apply(qkv, bias.contiguous(), rows, scale)
    if cpu_kernel and qkv.shape[-1] <= CHUNKED_FORWARD_MAX_HEAD_DIM:
        with torch.no_grad():
            return _grouped_forward(qkv, bias, rows, scale)[0]
    # inference, or a device whose SDPA backends differentiate the mask themselves
    return _sdpa_window_attention(qkv, bias, rows, scale)


def _sdpa_window_attention(qkv: Tensor, bias: Tensor, rows: tuple[int, ...], scale: float) -> Tensor:
    """The branch of :func:`grouped_window_attention` for CUDA and bf16: one ``scaled_dot_product_attention`` per group.

    Takes and returns what :func:`grouped_window_attention` does (``bias`` already in ``qkv``'s dtype); autograd
    gives the gradients of ``qkv`` and ``bias`` (on the CPU through SDPA's math backend, which the tests use to
    check this branch against MONAI's).
    """
    outs = []
    for part, mask in zip(qkv.split(rows), bias.unsqueeze(1).unbind(0), strict=True):
        q, k, v = _split_qkv(part)
        outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(1, 2))
    return outs[0] if len(outs) == 1 else torch.cat(outs)
