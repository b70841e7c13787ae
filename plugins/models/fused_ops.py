"""Fused elementwise ops for the decoder: RMSNorm with the residual add, rotary embedding
applied to q and k in place, and SiLU(gate) * up.

Unfused, each is five to fifteen small kernels per layer, which at decode batch sizes cost
more than the layer's matmuls.  On CUDA tensors each is one Triton kernel; elsewhere (and
when Triton is missing) the torch reference runs.  The kernels round wherever the torch
reference rounds (to the activation dtype after each op), so bf16 results agree with it
and fp32 results are the same math.

``use_fused(x)`` says which path a tensor takes; ``TRITON_INTERPRET=1`` lets the kernels run
on CPU tensors for tests, through ``force=True``.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch
import torch.nn.functional as F

from pagedllm.dependent_launch import pdl_launch


@functools.cache
def _kernels():
    try:
        if importlib.util.find_spec("triton") is None:
            return None
        from pagedllm.plugins.models import fused_kernels
    except Exception:  # a broken Triton must not break the model: the torch path runs
        return None
    return fused_kernels


def use_fused(x: torch.Tensor) -> bool:
    return x.is_cuda and _kernels() is not None


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _pdl(x: torch.Tensor, kind: str | None = None) -> dict:
    """The launch arguments for programmatic dependent launch (see dependent_launch)."""
    return pdl_launch(x.device, kind)


# ---- RMSNorm --------------------------------------------------------------------------------
def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None, force: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``norm(x + residual)`` and the new residual ``x + residual`` (or ``norm(x)``, None).

    ``x`` is [..., dim]; the norm runs over the last axis.  ``x`` may be a float32 sum
    (``norm_mlp``) beside a half-precision residual: it is rounded to the residual's dtype.
    """
    if not (force or use_fused(x)):
        if residual is not None:
            x = x.to(residual.dtype) + residual  # a float32 x rounded first
            return rms_norm_reference(x, weight, eps), x
        return rms_norm_reference(x, weight, eps), None
    k = _kernels()
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=residual.dtype if residual is not None else x.dtype,
                      device=x.device)
    rows, dim = x2.shape
    res_out = None
    r2 = x2  # unused without a residual
    if residual is not None:
        r2 = residual.reshape(-1, dim)
        res_out = torch.empty_like(out)
    if rows:
        k.rms_norm_kernel[(rows,)](
            x2, r2, weight, out, res_out if res_out is not None else out, dim,
            x2.stride(0), r2.stride(0), out.stride(0), eps,
            HAS_RESIDUAL=residual is not None, BLOCK=_next_pow2(dim), **_pdl(x2), num_warps=4)
    return out.view(shape), (res_out.view(shape) if res_out is not None else None)


# ---- rotary embedding -----------------------------------------------------------------------
def rotary(q: torch.Tensor, k: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
           force: bool = False,
           qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [tokens, heads, head_dim] and k [tokens, kv_heads, head_dim] by their
    positions (the halves of head_dim rotate as pairs).  The fused path works in place.

    ``cos_sin``: the step's (cos, sin), each [tokens, 1, head_dim], computed once per step by
    the caller (``RotaryEmbedding.cos_sin``): in q's dtype for the reference path, and for
    the fused one best as float32 tensors holding the values rounded to q's dtype.  (Given
    bf16 tables, the compiler turns each product-and-sum into one bf16 FMA that skips the
    reference's rounding of the first product: 12% of outputs then differ by an ulp.  With
    a float32 operand it cannot.)
    ``qk_norm``: (q weight, k weight, eps) of an RMSNorm over each head applied first
    (Qwen3); fused, it costs nothing beyond the rotation's own loads.
    """
    cos, sin = cos_sin
    if not (force or use_fused(q)):
        from .rope import apply_rotary

        if qk_norm is not None:
            q = rms_norm_reference(q, qk_norm[0], qk_norm[2])
            k = rms_norm_reference(k, qk_norm[1], qk_norm[2])
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    kern = _kernels()
    t, nq, d = q.shape
    nk = k.shape[1]
    cos, sin = cos.reshape(t, d).float(), sin.reshape(t, d).float()  # no-ops when float32
    if cos.stride(-1) != 1 or sin.stride(0) != cos.stride(0):
        cos, sin = cos.contiguous(), sin.contiguous()
    q_w, k_w, eps = qk_norm if qk_norm is not None else (cos, cos, 0.0)
    if t:
        kern.rotary_kernel[(t,)](
            q, k, cos, sin, q_w, k_w, eps,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0),
            NQ=nq, NK=nk, NQ_PAD=_next_pow2(nq), NK_PAD=_next_pow2(nk), HALF=d // 2,
            HAS_NORM=qk_norm is not None, **_pdl(q), num_warps=4)
    return q, k


# ---- SiLU(gate) * up ------------------------------------------------------------------------
def silu_and_mul(gate_up: torch.Tensor, force: bool = False) -> torch.Tensor:
    """``silu(gate_up[:, :n]) * gate_up[:, n:]`` for gate_up [tokens, 2n]."""
    n = gate_up.shape[-1] // 2
    if not (force or use_fused(gate_up)):
        return F.silu(gate_up[..., :n]) * gate_up[..., n:]
    kern = _kernels()
    x = gate_up.reshape(-1, 2 * n)
    out = torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)
    block = min(1024, _next_pow2(n))
    if x.shape[0]:
        kern.silu_and_mul_kernel[(x.shape[0], -(-n // block))](
            x, out, n, x.stride(0), out.stride(0), BLOCK=block, **_pdl(x), num_warps=4)
    return out.view(*gate_up.shape[:-1], n)


# ---- one-row linear layers (decode at batch 1) -----------------------------------------------
# A one-row linear layer on CUDA in bf16/fp16 runs as ``gemv_kernel``: at one row a matmul
# only streams its weight, and cuBLAS picks tiles (and split-K passes) made for larger M that
# leave much of the bandwidth unused on mid-sized weights.  fp32 keeps cuBLAS, so fp32
# results stay those of the torch reference.  The kernel serves up to a few rows, but on an
# H100 it lost to cuBLAS by 3-4x at four rows (``bench gemv --rows 1,4``), so only one row
# takes it.
GEMV_MAX_ROWS = 1
# A product whose K runs in tiles (``gemv_config``: K past 8192) stays with cuBLAS past this
# many weight elements: on the H200 with PDL (``bench gemv --sweep``, 2026-12-01) Llama-8B's
# down_proj (K 14336) took 34.2 us at its best tile config against cuBLAS's 31.7 (with
# the SiLU kernel).  One-tile products are ours at any size: there the GEMV won on every
# preset layer, e.g. Llama-8B qkv with its norm 15.0 against 17.1 us, gate_up with its
# norm 55.6 against 56.8, lm_head 229.9 against 238.1, Qwen3-0.6B o_proj 2.2 against 12.6.
# PAGEDLLM_GEMV_MAX_WEIGHT_ELEMENTS overrides it, for benchmarking the alternatives.
GEMV_MAX_WEIGHT_ELEMENTS = int(float(os.environ.get("PAGEDLLM_GEMV_MAX_WEIGHT_ELEMENTS",
                                                    4096 * 4096)))
# The RMSNorm prologue makes every program read the input row (a few KiB, from L2): in one
# tile that pays at every preset's hidden size (Qwen3-0.6B qkv with its norm 3.2 us against
# 3.2 without; Llama-8B's, 4096 wide, 15.0 against 16.3 plus a norm kernel); a tiled K
# reads it twice, which at 4096 cost 5 us before the one-tile path existed.
# PAGEDLLM_NORM_PROLOGUE_MAX_K overrides it.
NORM_PROLOGUE_MAX_K = int(os.environ.get("PAGEDLLM_NORM_PROLOGUE_MAX_K", 4096))
_GEMV_DTYPES = (torch.bfloat16, torch.float16)
# The first layer's GEMV gathers its embedding rows (``rms_norm_linear``'s ``ids``);
# PAGEDLLM_GEMV_GATHER=0 gathers with torch first, for benchmarking.
GEMV_GATHER = os.environ.get("PAGEDLLM_GEMV_GATHER", "1") == "1"


# A program's weight slab up to this many elements is one tile (``ONE_TILE``): all of it is
# requested at once, before the PDL wait, and a norm prologue reads x once.
ONE_TILE_MAX_ELEMENTS = int(os.environ.get("PAGEDLLM_GEMV_ONE_TILE_MAX_ELEMENTS", 32768))
# A register cap per thread for the GEMV (None: the compiler's choice).  Lower caps let the
# next kernel's programs become resident beside this one's (PDL) sooner.
# PAGEDLLM_GEMV_MAXNREG sets it, for benchmarking.
GEMV_MAXNREG = int(os.environ.get("PAGEDLLM_GEMV_MAXNREG", 0)) or None
# Warps per GEMV program (None: ``gemv_config``'s); PAGEDLLM_GEMV_WARPS, for benchmarking.
GEMV_WARPS = int(os.environ.get("PAGEDLLM_GEMV_WARPS", 0)) or None
# One-row products multiply in the weight tile's own layout (the kernel's ROW_DOT, see
# ``_gemv_dot``) where that was measured to win: 4-warp programs without the SiLU prologue,
# and with it at two weight rows a program (``SILU_ROW_DOT_MAX_BLOCK_N``).
# On the H200 (W2 Qwen3-0.6B, device time per step, 2026-12-02): 0.774 ms without ROW_DOT,
# 0.762 with it on the plain products (o_proj, lm_head), 0.725 on the normed ones (qkv,
# gate_up), 0.719 on both; but 0.926 on the SiLU one (down_proj) alone, at 8 rows (ptxas
# for sm90: 255 registers and 376 bytes of spills; 159 and none at 2 rows).  The 8-warp
# programs of 4096-wide models were not measured, so they keep the [M, N, K] product.
# PAGEDLLM_GEMV_ROW_DOT ("plain,norm,silu", any subset, or "none") sets the kinds, for
# benchmarking, and then at any warp count and row count.
ROW_DOT_KINDS = frozenset(os.environ.get("PAGEDLLM_GEMV_ROW_DOT", "plain,norm").split(","))
ROW_DOT_WARPS = 4 if "PAGEDLLM_GEMV_ROW_DOT" not in os.environ else None  # None: any
SILU_ROW_DOT_MAX_BLOCK_N = 2 if "PAGEDLLM_GEMV_ROW_DOT" not in os.environ else 0


# Weight rows per one-tile program by kind ("silu=2,norm=8": down_proj 2, normed 8; unset:
# ``gemv_config``'s).  PAGEDLLM_GEMV_BLOCK_N sets it, for benchmarking.
BLOCK_N_BY_KIND = {kind: int(n) for kind, n in (
    item.split("=") for item in os.environ.get("PAGEDLLM_GEMV_BLOCK_N", "").split(",") if item)}
# Warps per one-tile program by kind ("silu=8"; unset: ``gemv_config``'s).
# PAGEDLLM_GEMV_WARPS_BY_KIND sets it, for benchmarking.
WARPS_BY_KIND = {kind: int(n) for kind, n in (
    item.split("=") for item in os.environ.get("PAGEDLLM_GEMV_WARPS_BY_KIND", "").split(",")
    if item)}


def _kind(silu_mul: bool, norm: bool) -> str:
    return "silu" if silu_mul else "norm" if norm else "plain"


def _row_dot(m_pad: int, warps: int, silu_mul: bool, norm: bool, block_n: int = 8) -> bool:
    kind = _kind(silu_mul, norm)
    return (m_pad == 1 and (kind in ROW_DOT_KINDS
                            or (silu_mul and block_n <= SILU_ROW_DOT_MAX_BLOCK_N))
            and (ROW_DOT_WARPS is None or warps == ROW_DOT_WARPS))


def gemv_config(n: int, k: int, m_pad: int, normed: bool = False, silu: bool = False
                ) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) for an [m_pad, k] x [n, k]^T product
    (``normed``: with the RMSNorm prologue; ``silu``: with the SiLU-and-mul one).

    Where a program's slab fits ``ONE_TILE_MAX_ELEMENTS`` it is one tile of 16 weight rows
    (8 under 4096 outputs or with the norm prologue, fewer where K is long), four warps
    (eight for 4096-deep slabs of wide weights): a few fat programs per SM.  At one row,
    the SiLU product (down_proj) takes 2 rows, and normed products with K up to 2048 take
    4 (in-model, H200, W2 Qwen3-0.6B device time per step, 2026-12-02, one call: 0.622 ms
    at 8 and 8 rows, 0.601 with down_proj at 2 rows, 0.597 with qkv and gate_up at 4 too;
    down_proj at 2 rows repeated 0.601 in another call; down_proj at 1 row 0.622, at 2
    rows and 8 warps 0.612; at 8 rows and 8 warps, which spill nothing, 0.616; these
    defaults measured 0.597 again in a later call, TPOT 0.614 against 0.633).  Before
    that, normed products took 8 rows over 16 (0.620 and 0.621 against 0.629 and 0.630,
    within run-to-run spread).  Llama-8B's K of 4096
    (``--sweep``): 8 rows, 8 warps, best or within 0.5 us of it on qkv, gate_up and lm_head.
    From ``python -m pagedllm.bench.gemv --sweep`` on the H200 with PDL (2026-12-01), the
    best or within 0.1 us of it on every Qwen3-0.6B layer: qkv 3.1 us (was 5.0 with two
    rows a program), o_proj 2.2 (2.5), gate_up 4.6-4.8 (6.3), down 2.8 (4.4), lm_head 73.4
    (77.8; cuBLAS 78.2).  Longer K runs in tiles of 1024, the rule of the H100 sweep: two
    weight rows a program unless the weight is wide or square-and-deep, eight for the very
    deep down_proj of 8B models, the [m_pad, BLOCK_N, BLOCK_K] tile capped so that more
    rows shorten K rather than spill registers.
    """
    k_pad = _next_pow2(k)
    if _one_tile(k, m_pad):
        if m_pad == 1 and silu:
            block_n = 2
        elif m_pad == 1 and normed and k_pad <= 2048:
            block_n = 4
        else:
            block_n = 16 if n >= 4096 and not normed else 8
        while block_n > 1 and block_n * m_pad * k_pad > ONE_TILE_MAX_ELEMENTS:
            block_n //= 2
        return block_n, k_pad, 8 if k_pad >= 4096 and n >= 4096 else 4, 1
    if k >= 8192:
        block_n = 8
    elif n >= 8192 or (k >= 4096 and n <= k):
        block_n = 4
    else:
        block_n = 2
    budget = 8192 if block_n == 8 else 4096
    block_k = min(1024, k_pad, max(128, budget // (block_n * m_pad)))
    return block_n, block_k, 4, 2 if n >= 8192 else 4


def _one_tile(k: int, m_pad: int) -> bool:
    """Whether ``gemv_config`` makes a program's weight slab one tile."""
    k_pad = _next_pow2(k)
    return m_pad * k_pad <= ONE_TILE_MAX_ELEMENTS and k_pad <= 8192


def _gemv_applies(x2: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x2.shape[0] <= GEMV_MAX_ROWS
            and (weight.numel() <= GEMV_MAX_WEIGHT_ELEMENTS
                 or _one_tile(weight.shape[1], _next_pow2(x2.shape[0])))
            and weight.dtype in _GEMV_DTYPES
            and x2.dtype == weight.dtype and weight.stride(-1) == 1 and use_fused(x2))


def _gemv(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu_mul: bool,
          interpreted: bool, config: tuple[int, int, int, int] | None = None,
          norm: tuple[torch.Tensor, float] | None = None, residual: torch.Tensor | None = None,
          ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x2 @ weight^T + bias, the new residual stream when ``residual`` is given, or the
    gathered rows ``x2[ids]`` when ``ids`` is: then x2 is a table, see the kernel's GATHER)."""
    m = x2.shape[0] if ids is None else ids.shape[0]
    n, k = weight.shape
    # The weight's dtype: x2 may be a float32 sum (norm_mlp) beside a half residual.
    out = torch.empty((m, n), dtype=weight.dtype, device=x2.device)
    r_out = torch.empty((m, k), dtype=weight.dtype, device=x2.device) \
        if residual is not None or ids is not None else None
    if m == 0:
        return out, r_out
    m_pad = _next_pow2(m)
    block_n, block_k, warps, stages = config or gemv_config(n, k, m_pad, norm is not None,
                                                            silu_mul)
    if config is None and block_k >= k:
        kind = _kind(silu_mul, norm is not None)
        block_n = BLOCK_N_BY_KIND.get(kind, block_n)
        warps = WARPS_BY_KIND.get(kind, warps)
    warps = GEMV_WARPS or warps
    if interpreted:  # the interpreter's cost grows with tile size
        block_k = min(block_k, max(64, _next_pow2(k) if k <= 128 else 64))
    norm_w, eps = norm if norm is not None else (weight, 0.0)
    r = residual if residual is not None else x2
    _kernels().gemv_kernel[(-(-n // block_n),)](
        x2, weight, bias if bias is not None else weight, out, m, n, k,
        x2.stride(0), weight.stride(0), out.stride(0),
        norm_w, r, r_out if r_out is not None else out, r.stride(0), eps,
        ids if ids is not None else x2, GATHER=_gather_mode(ids, block_k >= k),
        HAS_BIAS=bias is not None, SILU_MUL=silu_mul, NORM=norm is not None,
        NORM_RES=residual is not None, EVEN_K=k % block_k == 0, ONE_TILE=block_k >= k,
        M_PAD=m_pad, BLOCK_N=block_n, BLOCK_K=block_k,
        **_pdl(x2, _kind(silu_mul, norm is not None)), num_warps=warps,
        num_stages=stages, ROW_DOT=_row_dot(m_pad, warps, silu_mul, norm is not None, block_n),
        **({"maxnreg": GEMV_MAXNREG} if GEMV_MAXNREG else {}))
    return out, r_out


def _gather_mode(ids: torch.Tensor | None, one_tile: bool) -> int:
    """The GEMV's GATHER: 0 none; 2 ids read before the PDL wait, only for one tile while
    a CUDA graph is captured (the model's first kernel: the step's inputs were copied in
    before the graph began); else 1, after the wait (see ``gemv_kernel``)."""
    if ids is None:
        return 0
    return 2 if one_tile and ids.is_cuda and torch.cuda.is_current_stream_capturing() else 1


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           force: bool = False) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; few-row bf16/fp16 products on CUDA (or any with
    ``force``) run as the Triton GEMV."""
    k = weight.shape[1]
    x2 = x.reshape(-1, k)
    if not (force or _gemv_applies(x2, weight)):
        return F.linear(x, weight, bias)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return _gemv(x2, weight, bias, False, force and not x.is_cuda)[0].view(*x.shape[:-1], -1)


def silu_mul_linear(gate_up: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None = None, force: bool = False) -> torch.Tensor:
    """``F.linear(silu_and_mul(gate_up), weight, bias)``; on the GEMV path the activation is
    computed inside the product, one kernel instead of two."""
    n = gate_up.shape[-1] // 2
    x2 = gate_up.reshape(-1, 2 * n)
    if not (force or _gemv_applies(x2, weight)):
        return F.linear(silu_and_mul(gate_up), weight, bias)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return _gemv(x2, weight, bias, True, force and not gate_up.is_cuda)[0].view(
        *gate_up.shape[:-1], -1)


def rms_norm_linear(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                    eps: float, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    force: bool = False, ids: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``F.linear(rms_norm(x + residual), weight, bias)`` and the new residual stream
    ``x + residual`` (x itself when ``residual`` is None).  On the GEMV path the norm and the
    add are computed inside the product, one kernel instead of two.

    ``ids`` (1-D, with ``residual`` None): ``x`` is an embedding table and the input its
    rows ``x[ids]``; at one row the GEMV gathers them itself (no gather kernel), and the
    rows are returned as the residual stream."""
    k = weight.shape[1]
    if ids is not None:
        gathers = GEMV_GATHER and ids.shape[0] <= GEMV_MAX_ROWS
        if not (residual is None and ids.dim() == 1 and k <= NORM_PROLOGUE_MAX_K
                and (force or (gathers and _gemv_applies(x[:1], weight)))):
            return rms_norm_linear(F.embedding(ids, x), None, norm_weight, eps, weight, bias,
                                   force)
        return _gemv(x.contiguous(), weight, bias, False, force and not x.is_cuda,
                     norm=(norm_weight, eps), ids=ids.contiguous())
    x2 = x.reshape(-1, k)
    # A float32 x (a norm_mlp sum) goes in as it is where the GEMV takes the residual.
    like = residual.reshape(-1, k) if residual is not None and x.dtype != residual.dtype \
        else x2
    if not (force or (k <= NORM_PROLOGUE_MAX_K and _gemv_applies(like, weight))):
        h, new_residual = rms_norm(x, norm_weight, eps, residual, force=force)
        return linear(h, weight, bias), (x if residual is None else new_residual)
    x2 = x2.contiguous()
    r2 = residual.reshape(-1, k).contiguous() if residual is not None else None
    out, r_out = _gemv(x2, weight, bias, False, force and not x.is_cuda,
                       norm=(norm_weight, eps), residual=r2)
    return (out.view(*x.shape[:-1], -1),
            x if residual is None else r_out.view(residual.shape))


# ---- argmax of logits rows ----------------------------------------------------------------
# Greedy decoding's argmax over the vocabulary in two PDL launches (per-chunk maxima, then
# one program a row), for decode graphs: torch's argmax costs a W2 Qwen3-0.6B step 12.8 us
# on the H200 (8.8 us, and a 4 us gap: it cannot be launched with PDL); these two 2.8 us.
# Measured (H200, W2 Qwen3-0.6B, 2026-12-02, same call): device time per step 0.621 ms
# against 0.628, TPOT 0.632 against 0.641.  PAGEDLLM_FUSED_ARGMAX=0 turns it off.
FUSED_ARGMAX = os.environ.get("PAGEDLLM_FUSED_ARGMAX", "1") == "1"
ARGMAX_BLOCK = 4096  # columns per stage-1 program


def argmax(logits: torch.Tensor, force: bool = False,
           ids_out: torch.Tensor | None = None) -> torch.Tensor:
    """``logits.argmax(dim=-1)`` (int64) of [rows, vocab] logits: the first index of each
    row's maximum, NaN counting as the maximum (above +inf), as ``torch.argmax`` gives it.
    ``ids_out`` ([rows] int32): the same ids stored there too."""
    if not (force or (FUSED_ARGMAX and use_fused(logits))) or logits.dim() != 2:
        ids = logits.argmax(dim=-1)
        if ids_out is not None:
            ids_out.copy_(ids)
        return ids
    x = logits if logits.stride(-1) == 1 else logits.contiguous()
    rows, n = x.shape
    out = torch.empty(rows, dtype=torch.int64, device=x.device)
    if rows == 0 or n == 0:
        return logits.argmax(dim=-1) if n == 0 else out
    block = min(ARGMAX_BLOCK, _next_pow2(n))
    parts = -(-n // block)
    vals = torch.empty((rows, parts), dtype=torch.float32, device=x.device)
    idx = torch.empty((rows, parts), dtype=torch.int32, device=x.device)
    k = _kernels()
    k.argmax_partial_kernel[(rows, parts)](x, vals, idx, n, x.stride(0), BLOCK=block,
                                           **_pdl(x), num_warps=4)
    k.argmax_reduce_kernel[(rows,)](vals, idx, out, parts,
                                    ids_out if ids_out is not None else idx,
                                    BLOCK=_next_pow2(parts), HAS_IDS=ids_out is not None,
                                    **_pdl(x), num_warps=4)
    return out


# ---- the whole MLP of one row in one launch --------------------------------------------------
# RMSNorm, gate/up, SiLU and down_proj as one split-K kernel (``norm_mlp_kernel``) for decode
# at batch 1: two kernel ends fewer a layer, and down_proj's weights stream with gate_up's.
# Its output is a float32 sum built with atomics (so in no fixed order), which the next
# norm rounds.  Measured slower, so off unless PAGEDLLM_FUSED_MLP=1: on the H200 (W2
# Qwen3-0.6B, device time per step, 2026-12-02, one call) 0.703 ms with 8 columns and 4
# warps a program, 0.655 with 8 warps, 0.637 with 16 columns and 8 warps, against 0.628
# unfused; the kernel took 11-13 us a layer where gate_up and down_proj take 6.2 and 3.9.
# (down_proj stored transposed, so each program reads whole rows: 0.654-0.686, no better.)
FUSED_MLP = os.environ.get("PAGEDLLM_FUSED_MLP", "0") == "1"
# Intermediate columns and warps a program; PAGEDLLM_FUSED_MLP_COLUMNS and
# PAGEDLLM_FUSED_MLP_WARPS set them, for benchmarking.
MLP_COLUMNS = int(os.environ.get("PAGEDLLM_FUSED_MLP_COLUMNS", 8))
MLP_WARPS = int(os.environ.get("PAGEDLLM_FUSED_MLP_WARPS", 4))


def norm_mlp_applies(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                     force: bool = False) -> bool:
    """Whether ``norm_mlp`` takes this product: one row, half precision, on CUDA (or any
    with ``force``), and a hidden size of at most 2048.  (Wider models have bandwidth-bound
    MLPs near the floor already, and the atomics grow with hidden x intermediate / 8.)"""
    x2 = x.reshape(-1, x.shape[-1])
    return ((force or (FUSED_MLP and use_fused(x2) and gate_up.dtype in _GEMV_DTYPES))
            and x2.shape[0] == 1 and gate_up.shape[0] == 2 * down.shape[1]
            and gate_up.shape[1] == down.shape[0] == x2.shape[1] and x2.shape[1] <= 2048
            and gate_up.stride(-1) == 1 and down.stride(-1) == 1)


def norm_mlp(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
             gate_up: torch.Tensor, down: torch.Tensor, out_sum: torch.Tensor,
             zero: torch.Tensor) -> torch.Tensor:
    """``down(silu(g) * u)`` for ``[g | u] = gate_up(rms_norm(x + residual))``, added into
    ``out_sum`` ([1, H] float32, zero on entry); returns the residual stream x + residual.
    ``zero`` ([H] float32) is set to zero on the way (see ``norm_mlp_kernel``).  ``x`` may
    be an earlier ``out_sum`` (float32): it is rounded to ``residual``'s dtype first."""
    hidden = residual.shape[-1]
    inter = down.shape[1]
    x2 = x.reshape(1, hidden).contiguous()
    r2 = residual.reshape(1, hidden).contiguous()
    r_out = torch.empty_like(r2)
    grid = -(-inter // MLP_COLUMNS)
    _kernels().norm_mlp_kernel[(grid,)](
        x2, r2, norm_weight, gate_up, down, out_sum, zero, r_out, hidden, inter,
        gate_up.stride(0), down.stride(0), eps, J=MLP_COLUMNS, H_PAD=_next_pow2(hidden),
        ZERO_BLOCK=_next_pow2(-(-hidden // grid)), **_pdl(r2), num_warps=MLP_WARPS)
    return r_out.view(residual.shape)


# ---- o_proj over attention partitions ----------------------------------------------------------
# At small decode batches the triton backend leaves each head's attention in partitions
# (``AttentionBackend.forward_partials``) and o_proj combines them as it reads them
# (``combine_linear``): the attention kernel then ends without the atomic and the reloads
# of its own combine.  Measured (H200, W2, 2026-12-02 session 5, device time a step):
# Qwen3-0.6B 0.570 ms against 0.580 unfused at 128 rows a program (64 rows 0.573, 32 rows
# 0.623; 8 warps at 64, 128 or 256 rows 0.640, 0.607, 0.641); Llama-3.1-8B slower (4.42 at
# 64 rows against 4.08; not profiled: probably as its big one-row linears are cuBLAS's,
# which take the float32 sum through a cast), hence o_proj weights of at most
# O_PROJ_MAX_WEIGHT_ELEMENTS only.
# PAGEDLLM_FUSED_O_PROJ=0 turns it off.
FUSED_O_PROJ = os.environ.get("PAGEDLLM_FUSED_O_PROJ", "1") == "1"
O_PROJ_MAX_WEIGHT_ELEMENTS = int(float(os.environ.get(
    "PAGEDLLM_FUSED_O_PROJ_MAX_WEIGHT_ELEMENTS", 1 << 22)))  # Qwen3-0.6B's: 2M; Llama-8B's: 16M
# Rows of the float32 sums kept per layer (the per-head kernel's batches); down_proj's
# (``silu_mul_linear_sum``) have as many.
O_PROJ_MAX_ROWS = 4
# Output rows a program (every program reads its head's partitions from L2, so fewer rows
# cost more L2 reads; 128 measured fastest).  What ptxas gives each size: CONTRIBUTING.md.
# PAGEDLLM_FUSED_O_PROJ_BLOCK_N sets it, for benchmarking.
O_PROJ_BLOCK_N = int(os.environ.get("PAGEDLLM_FUSED_O_PROJ_BLOCK_N", 128))
O_PROJ_WARPS = int(os.environ.get("PAGEDLLM_FUSED_O_PROJ_WARPS", 4))  # the same, warps


O_PROJ_DTYPES = (torch.float16, torch.bfloat16)  # float32 keeps o_proj's one fixed sum


def combine_linear_applies(rows: int, weight: torch.Tensor, force: bool = False) -> bool:
    """Whether ``combine_linear`` may take o_proj for a decode step of ``rows`` rows: on
    CUDA (or any with ``force``), half precision, at most ``O_PROJ_MAX_ROWS`` rows, a
    weight of at most ``O_PROJ_MAX_WEIGHT_ELEMENTS`` elements (``force`` too)."""
    return _sum_op_applies(force or (FUSED_O_PROJ and use_fused(weight)), rows,
                           O_PROJ_MAX_ROWS, weight, O_PROJ_MAX_WEIGHT_ELEMENTS)


def _sum_op_applies(on: bool, rows: int, max_rows: int, weight: torch.Tensor,
                    max_elements: int) -> bool:
    """The rule every op that adds into a model's per-layer float32 sums shares: switched
    ``on``, 1 to ``max_rows`` rows, a contiguous half-precision weight of at most
    ``max_elements`` elements."""
    return (on and weight.numel() <= max_elements and weight.dtype in O_PROJ_DTYPES
            and 0 < rows <= max_rows and weight.stride(-1) == 1)


def combine_linear(partials, weight: torch.Tensor, out_sum: torch.Tensor,
                   zero: torch.Tensor) -> torch.Tensor:
    """``partials.combine() @ weight.T`` (``pagedllm.attention.AttentionPartials``: a decode
    step's attention left in partitions), added into ``out_sum`` ([rows, N] float32, zero
    on entry) and returned: each head's share is added with atomics, so in no fixed order,
    and its reader rounds it to the activation dtype (as o_proj rounds its output).
    ``zero`` (float32, contiguous) is set to zero on the way (see
    ``combine_linear_kernel``)."""
    rows, heads, splits, dim = partials.out.shape
    n, k = weight.shape
    if k != heads * dim or tuple(out_sum.shape) != (rows, n) or rows > O_PROJ_MAX_ROWS:
        raise ValueError(f"combine_linear: partials of {heads} x {dim}, weight {tuple(weight.shape)}, "
                         f"sum {tuple(out_sum.shape)} do not fit")
    block_n = min(O_PROJ_BLOCK_N, _next_pow2(n))
    blocks = -(-n // block_n)
    zero_block = _next_pow2(-(-zero.numel() // (heads * blocks)))
    _kernels().combine_linear_kernel[(heads, blocks)](
        partials.out, partials.m, partials.l, partials.seq_lens, weight, out_sum, zero,
        rows, n, splits, partials.granule, weight.stride(0), zero.numel(),
        NUM_HEADS=heads, HEAD_DIM=dim, BLOCK_N=block_n, CHUNK=32, ZERO_BLOCK=zero_block,
        MAX_ROWS=_next_pow2(O_PROJ_MAX_ROWS),
        **_pdl(out_sum, "plain"), num_warps=O_PROJ_WARPS)
    return out_sum


# ---- down_proj split over its input columns -----------------------------------------------------
# At one row the GEMV gives each program a few whole weight rows of down_proj, so every
# program reads all of gate/up (2 x intermediate values) after the PDL wait and reduces
# across its warps; split over the columns instead (``silu_mul_split_kernel``), a program
# reads its own block of them and sums inside each warp, and its share goes into a float32
# sum with atomics, which the next norm rounds (as o_proj's ``combine_linear``).  It also
# computes each SiLU once, where the GEMV's 512 programs each computed all 3072 of them.
# Measured (H200, W2 Qwen3-0.6B, device time a step, 2026-12-02 session 6, each figure
# from one call beside the unsplit 0.569-0.570 ms): 32 weight rows x 128 columns a
# program, 4 warps, 0.551 (three runs; TPOT 0.561 against 0.579-0.580); 16 x 256 0.552;
# 64 x 128 0.571-0.573; 128 x 128 0.584; 64 x 64 0.587; 16 x 128 0.576; 32 x 256 0.571;
# 128 x 64 and 256 x 64 0.584-0.590; 32 x 128 on 2 warps 0.571, 128 x 128 on 8 0.586.
# In the kernel timeline the split kernel adds 1.9 us a layer against the GEMV's 3.9,
# but the next layer's qkv GEMV starts later under PDL (4.3 us against 3.0; its programs
# find no room beside the split's); with the split's trigger at its start (PAGEDLLM_PDL_
# EARLY=attention,silu) qkv starts early but the split slows to 2.8: 0.558.
# PAGEDLLM_SPLIT_DOWN=0 turns it off; _BLOCK_N/_BLOCK_K/_WARPS set its tile, for
# benchmarking.
SPLIT_DOWN = os.environ.get("PAGEDLLM_SPLIT_DOWN", "1") == "1"
SPLIT_DOWN_MAX_ROWS = int(os.environ.get("PAGEDLLM_SPLIT_DOWN_MAX_ROWS", 1))
# As o_proj's: big models' down_proj is cuBLAS's, bandwidth-bound already.
SPLIT_DOWN_MAX_WEIGHT_ELEMENTS = int(float(os.environ.get(
    "PAGEDLLM_SPLIT_DOWN_MAX_WEIGHT_ELEMENTS", 1 << 22)))  # Qwen3-0.6B's: 3M
SPLIT_DOWN_BLOCK_N = int(os.environ.get("PAGEDLLM_SPLIT_DOWN_BLOCK_N", 32))
SPLIT_DOWN_BLOCK_K = int(os.environ.get("PAGEDLLM_SPLIT_DOWN_BLOCK_K", 128))
SPLIT_DOWN_WARPS = int(os.environ.get("PAGEDLLM_SPLIT_DOWN_WARPS", 4))


def silu_mul_linear_sum_applies(rows: int, weight: torch.Tensor, force: bool = False) -> bool:
    """Whether ``silu_mul_linear_sum`` may take down_proj for ``rows`` rows: on CUDA (or
    any with ``force``), half precision, at most ``SPLIT_DOWN_MAX_ROWS`` rows (with
    ``force``: ``O_PROJ_MAX_ROWS``), a weight of at most ``SPLIT_DOWN_MAX_WEIGHT_ELEMENTS``."""
    max_rows = O_PROJ_MAX_ROWS if force else min(SPLIT_DOWN_MAX_ROWS, O_PROJ_MAX_ROWS)
    return _sum_op_applies(force or (SPLIT_DOWN and use_fused(weight)), rows, max_rows,
                           weight, SPLIT_DOWN_MAX_WEIGHT_ELEMENTS)


def silu_mul_linear_sum(gate_up: torch.Tensor, weight: torch.Tensor, out_sum: torch.Tensor,
                        zero: torch.Tensor) -> torch.Tensor:
    """``silu_and_mul(gate_up) @ weight.T`` added into ``out_sum`` ([rows, N] float32, zero
    on entry) and returned: the column blocks' shares are added with atomics, so in no
    fixed order, and its reader rounds it to the activation dtype (as down_proj rounds its
    output).  ``zero`` (float32, contiguous) is set to zero on the way."""
    x2 = gate_up.reshape(-1, gate_up.shape[-1])
    rows = x2.shape[0]
    n, k = weight.shape
    if x2.shape[1] != 2 * k or tuple(out_sum.shape) != (rows, n) or rows > O_PROJ_MAX_ROWS:
        raise ValueError(f"silu_mul_linear_sum: gate_up {tuple(gate_up.shape)}, weight "
                         f"{tuple(weight.shape)}, sum {tuple(out_sum.shape)} do not fit")
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    block_n = min(SPLIT_DOWN_BLOCK_N, _next_pow2(n))
    block_k = min(SPLIT_DOWN_BLOCK_K, _next_pow2(k))
    grid = (-(-k // block_k), -(-n // block_n))
    zero_block = _next_pow2(-(-zero.numel() // (grid[0] * grid[1])))
    _kernels().silu_mul_split_kernel[grid](
        x2, weight, out_sum, zero, rows, n, k, x2.stride(0), weight.stride(0), zero.numel(),
        BLOCK_N=block_n, BLOCK_K=block_k, ZERO_BLOCK=zero_block,
        **_pdl(out_sum, "silu"), num_warps=SPLIT_DOWN_WARPS)
    return out_sum
