"""The Triton kernels behind ``fused_ops`` (imported lazily: importing this imports Triton).

Every kernel computes in float32 and rounds to the output dtype exactly where the torch
reference rounds (``_round``), so bf16 outputs agree with it; for fp32 the rounding is a
no-op.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, dim,
    stride_x, stride_r, stride_o, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < dim
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(dtype)  # the residual stream, rounded as an unfused add rounds it
        tl.store(res_out_ptr + row * stride_o + cols, s, mask=mask)
        x = s.to(tl.float32)
    var = tl.sum(x * x, axis=0) / dim
    h = (x * tl.math.rsqrt(var + eps)).to(dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (w * h).to(dtype), mask=mask)


@triton.jit
def _rotate_heads(ptr, m, cos, sin, HALF: tl.constexpr):
    """x * cos + rotate_half(x) * sin in place for a [heads, 2 * HALF] tile, with
    rotate_half(x) = [-x2, x1]; each product and the sum rounded, as the reference's ops are."""
    dtype = ptr.dtype.element_ty
    x1 = tl.load(ptr, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + HALF, mask=m, other=0.0).to(tl.float32)
    o1 = (x1 * cos).to(dtype).to(tl.float32) + (-x2 * sin).to(dtype).to(tl.float32)
    o2 = (x2 * cos).to(dtype).to(tl.float32) + (x1 * sin).to(dtype).to(tl.float32)
    tl.store(ptr, o1.to(dtype), mask=m)
    tl.store(ptr + HALF, o2.to(dtype), mask=m)


@triton.jit
def rotary_kernel(
    q_ptr, k_ptr, pos_ptr, inv_freq_ptr, stride_qt, stride_qh, stride_kt, stride_kh,
    NQ: tl.constexpr, NK: tl.constexpr, NQ_PAD: tl.constexpr, NK_PAD: tl.constexpr,
    HALF: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    dtype = q_ptr.dtype.element_ty
    f = tl.arange(0, HALF)
    freq = tl.load(pos_ptr + t).to(tl.float32) * tl.load(inv_freq_ptr + f)
    # The reference casts cos and sin to the activation dtype before using them.
    cos = tl.cos(freq).to(dtype).to(tl.float32)[None, :]
    sin = tl.sin(freq).to(dtype).to(tl.float32)[None, :]
    hq = tl.arange(0, NQ_PAD)[:, None]
    _rotate_heads(q_ptr + t * stride_qt + hq * stride_qh + f[None, :], hq < NQ, cos, sin, HALF)
    hk = tl.arange(0, NK_PAD)[:, None]
    _rotate_heads(k_ptr + t * stride_kt + hk * stride_kh + f[None, :], hk < NK, cos, sin, HALF)


@triton.jit
def silu_and_mul_kernel(x_ptr, out_ptr, n, stride_x, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    dtype = out_ptr.dtype.element_ty
    g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + n + cols, mask=mask, other=0.0).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (s * u).to(dtype), mask=mask)
