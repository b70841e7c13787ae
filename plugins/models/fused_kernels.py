"""The Triton kernels behind ``fused_ops`` (imported lazily: importing this imports Triton).

Every kernel computes in float32 and rounds to the output dtype exactly where the torch
reference rounds (``_round``), so bf16 outputs agree with it; for fp32 the rounding is a
no-op.
"""
from __future__ import annotations

import triton
import triton.language as tl

from pagedllm.pdl_kernels import pdl_start, pdl_wait  # dependent_launch's contract

# Every kernel takes USE_PDL (``pdl_start`` first, ``pdl_wait`` before it reads or writes
# activations; weights may be read before the wait).


@triton.jit
def rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, dim,
    stride_x, stride_r, stride_o, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_start(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < dim
    dtype = out_ptr.dtype.element_ty
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    pdl_wait(USE_PDL)
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if x_ptr.dtype.element_ty != dtype:  # a float32 sum (norm_mlp): round it as it was
        x = x.to(dtype).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(dtype)  # the residual stream, rounded as an unfused add rounds it
        tl.store(res_out_ptr + row * stride_o + cols, s, mask=mask)
        x = s.to(tl.float32)
    var = tl.sum(x * x, axis=0) / dim
    h = (x * tl.math.rsqrt(var + eps)).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (w * h).to(dtype), mask=mask)


@triton.jit
def _rotate_heads(ptr, m, cos, sin, norm_w_ptr, eps, HAS_NORM: tl.constexpr,
                  HALF: tl.constexpr):
    """x * cos + rotate_half(x) * sin in place for a [heads, 2 * HALF] tile, with
    rotate_half(x) = [-x2, x1]; each product and the sum rounded, as the reference's ops are.
    HAS_NORM: each head is first RMS-normalised over its 2 * HALF values and scaled by
    ``norm_w`` (Qwen3's q_norm/k_norm), rounded as ``rms_norm_kernel`` rounds."""
    dtype = ptr.dtype.element_ty
    x1 = tl.load(ptr, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + HALF, mask=m, other=0.0).to(tl.float32)
    if HAS_NORM:
        var = (tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF)
        scale = tl.math.rsqrt(var + eps)[:, None]
        f = tl.arange(0, HALF)[None, :]
        w1 = tl.load(norm_w_ptr + f).to(tl.float32)
        w2 = tl.load(norm_w_ptr + HALF + f).to(tl.float32)
        x1 = (w1 * (x1 * scale).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        x2 = (w2 * (x2 * scale).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    o1 = (x1 * cos).to(dtype).to(tl.float32) + (-x2 * sin).to(dtype).to(tl.float32)
    o2 = (x2 * cos).to(dtype).to(tl.float32) + (x1 * sin).to(dtype).to(tl.float32)
    tl.store(ptr, o1.to(dtype), mask=m)
    tl.store(ptr + HALF, o2.to(dtype), mask=m)


@triton.jit
def rotary_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr, q_norm_ptr, k_norm_ptr, eps,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_ct,
    NQ: tl.constexpr, NK: tl.constexpr, NQ_PAD: tl.constexpr, NK_PAD: tl.constexpr,
    HALF: tl.constexpr, HAS_NORM: tl.constexpr, USE_PDL: tl.constexpr,
):
    """Rotates token t's q and k heads in place by its row of the step's cos/sin tables
    ([tokens, 2 * HALF] float32, the two halves equal), which torch computed once per step
    exactly as the reference computes them, rather than once per layer here."""
    pdl_start(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    f = tl.arange(0, HALF)
    pdl_wait(USE_PDL)
    cos = tl.load(cos_ptr + t * stride_ct + f).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + t * stride_ct + f).to(tl.float32)[None, :]
    hq = tl.arange(0, NQ_PAD)[:, None]
    _rotate_heads(q_ptr + t * stride_qt + hq * stride_qh + f[None, :], hq < NQ, cos, sin,
                  q_norm_ptr, eps, HAS_NORM, HALF)
    hk = tl.arange(0, NK_PAD)[:, None]
    _rotate_heads(k_ptr + t * stride_kt + hk * stride_kh + f[None, :], hk < NK, cos, sin,
                  k_norm_ptr, eps, HAS_NORM, HALF)


@triton.jit
def silu_and_mul_kernel(x_ptr, out_ptr, n, stride_x, stride_o, BLOCK: tl.constexpr,
                        USE_PDL: tl.constexpr):
    pdl_start(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    pdl_wait(USE_PDL)
    mask = cols < n
    dtype = out_ptr.dtype.element_ty
    g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + n + cols, mask=mask, other=0.0).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (s * u).to(dtype), mask=mask)


@triton.jit
def _gemv_input(x_rows, r_rows, rk, mask, NORM_RES: tl.constexpr, dtype):
    """A [M_PAD, BLOCK_K] chunk of the product's input before any norm: x, or the residual
    stream x + residual rounded as an unfused add rounds it."""
    x = tl.load(x_rows + rk[None, :], mask=mask, other=0.0).to(tl.float32)
    if x_rows.dtype.element_ty != dtype:  # a float32 sum (norm_mlp): round it as it was
        x = x.to(dtype).to(tl.float32)
    if NORM_RES:
        r = tl.load(r_rows + rk[None, :], mask=mask, other=0.0).to(tl.float32)
        x = (x + r).to(dtype).to(tl.float32)
    return x


@triton.jit
def _gemv_prologue(x, x_rows, rk, x_mask, norm_w_ptr, scale, K, SILU_MUL: tl.constexpr,
                   NORM: tl.constexpr, dtype):
    """The product's input chunk from the loaded chunk x: silu(gate) * up, or the norm."""
    if SILU_MUL:
        u = tl.load(x_rows + K + rk[None, :], mask=x_mask, other=0.0).to(tl.float32)
        s = (x / (1.0 + tl.exp(-x))).to(dtype).to(tl.float32)
        x = (s * u).to(dtype).to(tl.float32)
    if NORM:
        h = (x * scale).to(dtype).to(tl.float32)
        nw = tl.load(norm_w_ptr + rk, mask=rk < K, other=0.0).to(tl.float32)[None, :]
        x = (nw * h).to(dtype).to(tl.float32)
    return x


@triton.jit
def _gemv_dot(x, w, M_PAD: tl.constexpr, BLOCK_K: tl.constexpr, ROW_DOT: tl.constexpr):
    """x [M_PAD, BLOCK_K] times the weight tile w [BLOCK_N, BLOCK_K], transposed:
    [M_PAD, BLOCK_N] in float32.  ROW_DOT (one row, decode at batch 1): w is multiplied in
    its own layout with x broadcast along its rows.  The [M, N, K] product makes the
    compiler move the whole tile through shared memory first (sm90: 21 barriers after the
    PDL wait for an 8 x 2048 tile, against 3).  Where each is used: ``fused_ops._row_dot``."""
    if M_PAD == 1 and ROW_DOT:
        xv = tl.reshape(x, (BLOCK_K,))
        return tl.sum(w.to(tl.float32) * xv[None, :], axis=1)[None, :]
    else:
        return tl.sum(x[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)


@triton.jit
def _gathered_rows(x_ptr, ids_ptr, rm, m_mask, stride_xm):
    """[M_PAD, 1] pointers to the table rows ``ids[rm]`` (row 0 for padding rows)."""
    ids = tl.load(ids_ptr + rm, mask=m_mask, other=0).to(tl.int64)
    return x_ptr + ids[:, None] * stride_xm


@triton.jit
def gemv_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
    norm_w_ptr, r_ptr, r_out_ptr, stride_rm, eps, ids_ptr,
    HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr, NORM: tl.constexpr,
    NORM_RES: tl.constexpr, EVEN_K: tl.constexpr, ONE_TILE: tl.constexpr,
    M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr, ROW_DOT: tl.constexpr = False, GATHER: tl.constexpr = 0,
):
    """out[M, N] = x[M, K] @ w[N, K]^T (+ bias) for a few rows M: each program streams
    BLOCK_N rows of the weight once and serves every row of x with them.

    The weight's next tile is always in flight while the current one is multiplied, and
    the first is requested before the PDL wait, so it streams in while the previous kernel
    finishes.  ONE_TILE (BLOCK_K >= K): the program's whole weight slab is that one tile.

    SILU_MUL: x holds [gate | up] (2K wide) and the input is silu(gate) * up, computed
    on the fly (rounded as ``silu_and_mul_kernel`` rounds it) instead of by its own kernel.
    NORM: the input is RMSNorm(x) with weight ``norm_w`` (rounded as ``rms_norm_kernel``
    rounds it); with NORM_RES, RMSNorm(x + r), and program 0 also writes x + r to r_out
    (the residual stream).  Every program computes the row's variance itself (from the one
    tile, or in a first pass over x, a few KiB from L2): cheaper than a kernel of its own
    at decode.

    GATHER (NORM, not NORM_RES): x is a table (the token embedding) and row m of
    the input is its row ``ids[m]``; program 0 writes those rows to r_out (the residual
    stream starts there).  GATHER 2 (one tile, a CUDA graph's first kernel): the ids were
    copied in before the graph began and the table is a weight, so both are read before
    the PDL wait, and the gather costs no kernel and no time.  GATHER 1 reads the ids
    after the wait (eager steps: the kernel just before may have written them).
    """
    pdl_start(USE_PDL)
    pid = tl.program_id(0)
    dtype = out_ptr.dtype.element_ty
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, M_PAD)
    n_mask = rn < N
    m_mask = rm < M
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wn
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    r_rows = r_ptr + rm.to(tl.int64)[:, None] * stride_rm
    rk = tl.arange(0, BLOCK_K)
    if EVEN_K:
        w = tl.load(w_rows + rk[None, :], mask=n_mask[:, None], other=0.0)
    else:
        w = tl.load(w_rows + rk[None, :], mask=n_mask[:, None] & (rk < K)[None, :], other=0.0)
    if GATHER == 2:
        x_rows = _gathered_rows(x_ptr, ids_ptr, rm, m_mask, stride_xm)
        if ONE_TILE:
            x_gathered = _gemv_input(x_rows, r_rows, rk, m_mask[:, None] & (rk < K)[None, :],
                                     False, dtype)
    pdl_wait(USE_PDL)
    if GATHER == 1:
        x_rows = _gathered_rows(x_ptr, ids_ptr, rm, m_mask, stride_xm)
    if ONE_TILE:
        x_mask = m_mask[:, None] & (rk < K)[None, :]
        if GATHER == 2:
            x = x_gathered
        else:
            x = _gemv_input(x_rows, r_rows, rk, x_mask, NORM_RES, dtype)
        scale = 1.0
        if NORM:
            if NORM_RES or GATHER:
                if pid == 0:
                    r_out = r_out_ptr + rm.to(tl.int64)[:, None] * stride_rm + rk[None, :]
                    tl.store(r_out, x.to(dtype), mask=x_mask)
            scale = tl.math.rsqrt(tl.sum(x * x, axis=1) / K + eps)[:, None]
        x = _gemv_prologue(x, x_rows, rk, x_mask, norm_w_ptr, scale, K, SILU_MUL, NORM, dtype)
        acc = _gemv_dot(x, w, M_PAD, BLOCK_K, ROW_DOT)
    else:
        scale = 1.0
        if NORM:
            sumsq = tl.zeros([M_PAD], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                mask = m_mask[:, None] & (rk < K)[None, :]
                x = _gemv_input(x_rows, r_rows, rk, mask, NORM_RES, dtype)
                if NORM_RES or GATHER:
                    if pid == 0:
                        r_out = r_out_ptr + rm.to(tl.int64)[:, None] * stride_rm + rk[None, :]
                        tl.store(r_out, x.to(dtype), mask=mask)
                sumsq += tl.sum(x * x, axis=1)
            scale = tl.math.rsqrt(sumsq / K + eps)[:, None]
        acc = tl.zeros([M_PAD, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            rk_next = rk + BLOCK_K  # past K on the last tile: a load of nothing
            w_next = tl.load(w_rows + rk_next[None, :],
                             mask=n_mask[:, None] & (rk_next < K)[None, :], other=0.0)
            if EVEN_K:
                x_mask = m_mask[:, None]
            else:
                x_mask = m_mask[:, None] & (rk < K)[None, :]
            x = _gemv_input(x_rows, r_rows, rk, x_mask, NORM_RES, dtype)
            x = _gemv_prologue(x, x_rows, rk, x_mask, norm_w_ptr, scale, K, SILU_MUL, NORM,
                               dtype)
            acc += _gemv_dot(x, w, M_PAD, BLOCK_K, ROW_DOT)
            w = w_next
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
    tl.store(out, acc.to(dtype), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def argmax_partial_kernel(x_ptr, val_ptr, idx_ptr, n, stride_x, BLOCK: tl.constexpr,
                          USE_PDL: tl.constexpr):
    """Stage 1 of a row's argmax: program (row, p) writes the max of its BLOCK columns (as
    float32) and the first column holding it; where the columns hold a NaN (the maximum,
    as in ``torch.argmax``, above +inf too), the first NaN's column c as -c - 1."""
    pdl_start(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1)
    cols = p * BLOCK + tl.arange(0, BLOCK)
    pdl_wait(USE_PDL)
    x = tl.load(x_ptr + row * stride_x + cols, mask=cols < n, other=float("-inf"))
    x = x.to(tl.float32)
    nan = x != x
    first_nan = tl.min(tl.where(nan, cols, 2147483647), axis=0)
    best = tl.max(tl.where(nan, float("-inf"), x), axis=0)
    first = tl.min(tl.where(x == best, cols, 2147483647), axis=0)
    first = tl.where(first_nan < 2147483647, -first_nan - 1, first)
    out = row * tl.num_programs(1) + p
    tl.store(val_ptr + out, best)
    tl.store(idx_ptr + out, first)


@triton.jit
def argmax_reduce_kernel(val_ptr, idx_ptr, out_ptr, parts, ids_ptr, BLOCK: tl.constexpr,
                         USE_PDL: tl.constexpr, HAS_IDS: tl.constexpr = False):
    """Stage 2: each row's argmax from its ``parts`` partials (ties: the first column; a
    negative index is its chunk's first NaN, and chunks are in column order).  HAS_IDS:
    also stored as int32 at ``ids`` (a decode graph's next input ids)."""
    pdl_start(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    p = tl.arange(0, BLOCK)
    pdl_wait(USE_PDL)
    ok = p < parts
    v = tl.load(val_ptr + row * parts + p, mask=ok, other=float("-inf"))
    i = tl.load(idx_ptr + row * parts + p, mask=ok, other=2147483647)
    nan = ok & (i < 0)
    first_nan = tl.min(tl.where(nan, -i - 1, 2147483647), axis=0)
    best = tl.max(tl.where(nan, float("-inf"), v), axis=0)
    first = tl.min(tl.where(ok & ~nan & (v == best), i, 2147483647), axis=0)
    best_id = tl.where(first_nan < 2147483647, first_nan, first)
    tl.store(out_ptr + row, best_id.to(tl.int64))
    if HAS_IDS:
        tl.store(ids_ptr + row, best_id.to(tl.int32))


@triton.jit
def norm_mlp_kernel(
    x_ptr, r_ptr, norm_w_ptr, w_gu_ptr, w_down_ptr, sum_ptr, zero_ptr, r_out_ptr,
    H, I, stride_gu, stride_down, eps,
    J: tl.constexpr, H_PAD: tl.constexpr, ZERO_BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
):
    """A one-row decoder MLP in one launch: RMSNorm(x + r), gate/up, SiLU(gate) * up and
    down_proj, split over the intermediate axis.  Program p takes intermediate columns
    [p * J, (p + 1) * J): its gate and up rows of ``w_gu`` ([2I, H]) and those columns of
    ``w_down`` ([H, I]), all requested before the PDL wait, and adds its share of the
    down projection into ``sum`` ([H] float32, zero beforehand) with atomics.  So the sum
    is float32 in no fixed order; its reader rounds it to the activation dtype, as the
    unfused down_proj rounds its output.  Every other rounding is the unfused ops'.
    Program 0 writes the residual stream x + r to ``r_out``; the programs together zero
    ``zero`` (the previous layer's sum, read by now) for a later layer to add into."""
    pdl_start(USE_PDL)
    pid = tl.program_id(0)
    dtype = r_out_ptr.dtype.element_ty
    k = tl.arange(0, H_PAD)
    k_ok = k < H
    rr = tl.arange(0, 2 * J)  # rows: J gate rows, then the J up rows of the same columns
    col = pid * J + rr % J
    row = tl.where(rr < J, col, I + col)
    w = tl.load(w_gu_ptr + row.to(tl.int64)[:, None] * stride_gu + k[None, :],
                mask=(col < I)[:, None] & k_ok[None, :], other=0.0)
    j = pid * J + tl.arange(0, J)
    wd = tl.load(w_down_ptr + k.to(tl.int64)[:, None] * stride_down + j[None, :],
                 mask=k_ok[:, None] & (j < I)[None, :], other=0.0)  # [H_PAD, J]
    pdl_wait(USE_PDL)
    zk = pid * ZERO_BLOCK + tl.arange(0, ZERO_BLOCK)
    tl.store(zero_ptr + zk, tl.zeros([ZERO_BLOCK], tl.float32), mask=zk < H)
    x = tl.load(x_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
    if x_ptr.dtype.element_ty != dtype:  # an earlier layer's float32 sum: round it first
        x = x.to(dtype).to(tl.float32)
    r = tl.load(r_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
    s = (x + r).to(dtype)
    if pid == 0:
        tl.store(r_out_ptr + k, s, mask=k_ok)
    s = s.to(tl.float32)
    scale = tl.math.rsqrt(tl.sum(s * s, axis=0) / H + eps)
    nw = tl.load(norm_w_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
    h = (nw * (s * scale).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    gu = tl.sum(w.to(tl.float32) * h[None, :], axis=1).to(dtype).to(tl.float32)  # [2J]
    gu2 = tl.reshape(gu, (2, J))
    first = (tl.arange(0, 2) == 0)[:, None]
    g = tl.sum(tl.where(first, gu2, 0.0), axis=0)
    u = tl.sum(tl.where(first, 0.0, gu2), axis=0)
    act = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
    act = (act * u).to(dtype).to(tl.float32)  # [J]
    part = tl.sum(wd.to(tl.float32) * act[None, :], axis=1)  # [H_PAD]
    tl.atomic_add(sum_ptr + k, part, mask=k_ok, sem="relaxed")


@triton.jit
def combine_linear_kernel(
    part_o_ptr, part_m_ptr, part_l_ptr, seq_lens_ptr, w_ptr, sum_ptr, zero_ptr,
    M, N, num_splits, granule, stride_wn, zero_size,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    CHUNK: tl.constexpr, ZERO_BLOCK: tl.constexpr, MAX_ROWS: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """o_proj of a decode step whose attention is left in partitions
    (``pagedllm.attention.AttentionPartials``), split over the heads: program (h, j)
    combines head h's partitions into its output (rounded to the weight's dtype, as the
    attention kernel rounds it) and adds ``w[j * BLOCK_N : (j + 1) * BLOCK_N, h * HEAD_DIM
    : (h + 1) * HEAD_DIM] @ o_h`` into ``sum`` ([M, N] float32, zero on entry) with
    atomics: the heads' shares in no fixed order, rounded by the sum's reader.  Its weight
    block and the rows' lengths (M <= MAX_ROWS) are read before the PDL wait.  The
    programs together zero ``zero`` (``zero_size`` floats: an earlier layer's sum, read by
    now)."""
    pdl_start(USE_PDL)
    h = tl.program_id(0)
    j = tl.program_id(1)
    dtype = w_ptr.dtype.element_ty
    rn = j * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, HEAD_DIM)
    n_ok = rn < N
    w = tl.load(w_ptr + rn.to(tl.int64)[:, None] * stride_wn + (h * HEAD_DIM + d)[None, :],
                mask=n_ok[:, None], other=0.0)  # [BLOCK_N, HEAD_DIM]
    # The rows' lengths are the step's metadata: read before the wait too.
    r = tl.arange(0, MAX_ROWS)
    lens = tl.load(seq_lens_ptr + r, mask=r < M, other=1)
    pdl_wait(USE_PDL)
    pid = h * tl.num_programs(1) + j
    zk = pid * ZERO_BLOCK + tl.arange(0, ZERO_BLOCK)
    tl.store(zero_ptr + zk, tl.zeros([ZERO_BLOCK], tl.float32), mask=zk < zero_size)
    c = tl.arange(0, CHUNK)
    for m in range(M):
        seq_len = tl.sum(tl.where(r == m, lens, 0), axis=0)
        # The attention kernel's partitions (triton backend, _decode_partition).
        size = tl.cdiv(tl.cdiv(seq_len, num_splits), granule) * granule
        used = tl.cdiv(seq_len, size)
        row = (m * NUM_HEADS + h).to(tl.int64) * num_splits
        m_run = tl.max(tl.full([CHUNK], float("-inf"), tl.float32), axis=0)
        w_sum = tl.sum(tl.zeros([CHUNK], tl.float32), axis=0)
        o = tl.zeros([HEAD_DIM], tl.float32)
        # CHUNK partitions a round with a running max (partition 0, in the first round,
        # keeps it finite).
        for c0 in range(0, used, CHUNK):
            ok = c0 + c < used
            pm = tl.load(part_m_ptr + row + c0 + c, mask=ok, other=float("-inf"))
            pl = tl.load(part_l_ptr + row + c0 + c, mask=ok, other=0.0)
            po = tl.load(part_o_ptr + (row + c0 + c)[:, None] * HEAD_DIM + d[None, :],
                         mask=ok[:, None], other=0.0)
            m_new = tl.maximum(m_run, tl.max(pm, axis=0))
            a = tl.exp2(m_run - m_new)
            wt = tl.exp2(pm - m_new) * pl
            o = o * a + tl.sum(po * wt[:, None], axis=0)
            w_sum = w_sum * a + tl.sum(wt, axis=0)
            m_run = m_new
        o = (o / w_sum).to(dtype).to(tl.float32)
        y = tl.sum(w.to(tl.float32) * o[None, :], axis=1)
        tl.atomic_add(sum_ptr + m * N + rn, y, mask=n_ok, sem="relaxed")


@triton.jit
def silu_mul_split_kernel(
    x_ptr, w_ptr, sum_ptr, zero_ptr, M, N, K, stride_xm, stride_wn, zero_size,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ZERO_BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """down_proj of a few rows split over its input columns: program (c, j) takes columns
    [c * BLOCK_K, (c + 1) * BLOCK_K) of silu(gate) * up (x holds [gate | up], 2K wide,
    rounded as ``silu_and_mul_kernel`` rounds it) and weight rows [j * BLOCK_N, (j + 1) *
    BLOCK_N), and adds its share into ``sum`` ([M, N] float32, zero on entry) with atomics,
    in no fixed order; the sum's reader rounds it.  Its weight block is read before the
    PDL wait; after it, each program reads only its own columns of x (where one program a
    weight-row block would read all 2K of them and reduce across warps).  The programs
    together zero ``zero`` (``zero_size`` floats: an earlier layer's sum, read by now)."""
    pdl_start(USE_PDL)
    c = tl.program_id(0)
    j = tl.program_id(1)
    dtype = w_ptr.dtype.element_ty
    rn = j * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = c * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok = rn < N
    k_ok = rk < K
    w = tl.load(w_ptr + rn.to(tl.int64)[:, None] * stride_wn + rk[None, :],
                mask=n_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_K]
    pdl_wait(USE_PDL)
    pid = c * tl.num_programs(1) + j
    zk = pid * ZERO_BLOCK + tl.arange(0, ZERO_BLOCK)
    tl.store(zero_ptr + zk, tl.zeros([ZERO_BLOCK], tl.float32), mask=zk < zero_size)
    for m in range(M):
        row = x_ptr + (m * stride_xm).to(tl.int64)
        g = tl.load(row + rk, mask=k_ok, other=0.0).to(tl.float32)
        u = tl.load(row + K + rk, mask=k_ok, other=0.0).to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
        act = (s * u).to(dtype).to(tl.float32)
        y = tl.sum(w.to(tl.float32) * act[None, :], axis=1)  # [BLOCK_N]
        tl.atomic_add(sum_ptr + m * N + rn, y, mask=n_ok, sem="relaxed")
