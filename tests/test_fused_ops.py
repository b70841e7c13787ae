"""The decoder's fused Triton ops against their torch references, on fresh random inputs.

They run on a GPU natively, or on CPU tensors under ``TRITON_INTERPRET=1`` (CI runs this
module that way from ``test_triton_backend.test_interpreted_checks_pass``).
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from pagedllm.plugins.models import fused_ops
from pagedllm.plugins.models.rope import apply_rotary, inverse_frequencies

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAVE_TRITON = importlib.util.find_spec("triton") is not None
pytestmark = pytest.mark.skipif(
    not HAVE_TRITON or not (CUDA or INTERPRET),
    reason="needs triton and a CUDA device or TRITON_INTERPRET=1")
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPES = [torch.float32, torch.bfloat16]


def _close(got, want, dtype):
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:  # same roundings as the reference; the float32 math inside may differ by an ulp
        atol = 1e-2 if CUDA else 3e-2  # the interpreter also truncates where GPUs round
        torch.testing.assert_close(got.float(), want.float(), rtol=1.6e-2, atol=atol)
        if CUDA:
            assert (got != want).float().mean() < 0.02


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [64, 96])
def test_triton_rms_norm_with_residual(dtype, dim):
    gen = torch.Generator().manual_seed(dim)
    x, r = (torch.randn(7, dim, generator=gen).to(DEVICE, dtype) for _ in range(2))
    w = (1 + 0.1 * torch.randn(dim, generator=gen)).to(DEVICE, dtype)
    out, res = fused_ops.rms_norm(x, w, 1e-6, r, force=True)
    want_res = x + r
    if CUDA or dtype == torch.float32:  # the residual stream: one rounded add, exactly
        assert torch.equal(res, want_res)
    else:  # the interpreter rounds float32 -> bfloat16 toward zero, the GPU to nearest
        _close(res, want_res, dtype)
    _close(out, fused_ops.rms_norm_reference(want_res, w, 1e-6), dtype)
    alone, none = fused_ops.rms_norm(x.view(7, 1, dim), w, 1e-6, force=True)
    assert none is None and alone.shape == (7, 1, dim)
    _close(alone.view(7, dim), fused_ops.rms_norm_reference(x, w, 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_rotary_in_place_matches_reference(dtype):
    gen = torch.Generator().manual_seed(3)
    t, nq, nk, d = 5, 6, 2, 32
    qkv = torch.randn(t, (nq + 2 * nk) * d, generator=gen).to(DEVICE, dtype)
    q = qkv[:, : nq * d].view(t, nq, d)  # strided views, as the decoder passes them
    k = qkv[:, nq * d : (nq + nk) * d].view(t, nk, d)
    positions = torch.tensor([0, 3, 17, 900, 40000], device=DEVICE)
    inv_freq = inverse_frequencies(d, {"rope_type": "default", "rope_theta": 1e6}).to(DEVICE)
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]
    want_q, want_k = apply_rotary(q.clone(), cos, sin), apply_rotary(k.clone(), cos, sin)
    v_before = qkv[:, (nq + nk) * d :].clone()
    got_q, got_k = fused_ops.rotary(q, k, positions, inv_freq, force=True)
    assert got_q.data_ptr() == q.data_ptr()  # in place
    _close(got_q, want_q, dtype)
    _close(got_k, want_k, dtype)
    assert torch.equal(qkv[:, (nq + nk) * d :], v_before)  # v untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [48, 1500])
def test_triton_silu_and_mul(dtype, n):
    gen = torch.Generator().manual_seed(n)
    x = (3 * torch.randn(4, 2 * n, generator=gen)).to(DEVICE, dtype)
    want = F.silu(x[:, :n]) * x[:, n:]
    _close(fused_ops.silu_and_mul(x, force=True), want, dtype)
