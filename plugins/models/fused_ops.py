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

import torch
import torch.nn.functional as F


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

    ``x`` is [..., dim]; the norm runs over the last axis.
    """
    if not (force or use_fused(x)):
        if residual is not None:
            x = x + residual
            return rms_norm_reference(x, weight, eps), x
        return rms_norm_reference(x, weight, eps), None
    k = _kernels()
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
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
            HAS_RESIDUAL=residual is not None, BLOCK=_next_pow2(dim), num_warps=4)
    return out.view(shape), (res_out.view(shape) if res_out is not None else None)


# ---- rotary embedding -----------------------------------------------------------------------
def rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
           cos_sin=None, force: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [tokens, heads, head_dim] and k [tokens, kv_heads, head_dim] by their
    positions (the halves of head_dim rotate as pairs).  The fused path works in place.

    ``cos_sin``: the reference path's (cos, sin), computed once per step by the caller.
    """
    if not (force or use_fused(q)):
        from .rope import apply_rotary

        cos, sin = cos_sin
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    kern = _kernels()
    t, nq, d = q.shape
    nk = k.shape[1]
    if t:
        kern.rotary_kernel[(t,)](
            q, k, positions, inv_freq, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            NQ=nq, NK=nk, NQ_PAD=_next_pow2(nq), NK_PAD=_next_pow2(nk), HALF=d // 2,
            num_warps=4)
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
            x, out, n, x.stride(0), out.stride(0), BLOCK=block, num_warps=4)
    return out.view(*gate_up.shape[:-1], n)
