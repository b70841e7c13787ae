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
pytestmark = [pytest.mark.skipif(
    not HAVE_TRITON or not (CUDA or INTERPRET),
    reason="needs triton and a CUDA device or TRITON_INTERPRET=1")]
if CUDA:  # so that the GPU test run (``-m gpu``) includes them; in CI they run interpreted
    pytestmark.append(pytest.mark.gpu)
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
    got_q, got_k = fused_ops.rotary(q, k, (cos, sin), force=True)
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


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_rotary_with_qk_norm_matches_norm_then_rotary(dtype):
    gen = torch.Generator().manual_seed(11)
    t, nq, nk, d = 4, 4, 2, 32
    qkv = (2 * torch.randn(t, (nq + 2 * nk) * d, generator=gen)).to(DEVICE, dtype)
    q = qkv[:, : nq * d].view(t, nq, d)
    k = qkv[:, nq * d : (nq + nk) * d].view(t, nk, d)
    q_w, k_w = ((1 + 0.2 * torch.randn(d, generator=gen)).to(DEVICE, dtype) for _ in range(2))
    positions = torch.tensor([0, 5, 77, 3000], device=DEVICE)
    inv_freq = inverse_frequencies(d, {"rope_type": "default", "rope_theta": 1e6}).to(DEVICE)
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]
    want_q = apply_rotary(fused_ops.rms_norm_reference(q.clone(), q_w, 1e-6), cos, sin)
    want_k = apply_rotary(fused_ops.rms_norm_reference(k.clone(), k_w, 1e-6), cos, sin)
    # The reference path of the op itself gives the same (norm, then rotate).
    ref_q, ref_k = fused_ops.rotary(q.clone().cpu(), k.clone().cpu(), (cos.cpu(), sin.cpu()),
                                    qk_norm=(q_w.cpu(), k_w.cpu(), 1e-6))
    torch.testing.assert_close(ref_q, want_q.cpu())
    torch.testing.assert_close(ref_k, want_k.cpu())
    got_q, got_k = fused_ops.rotary(q, k, (cos, sin), force=True,
                                    qk_norm=(q_w, k_w, 1e-6))
    assert got_q.data_ptr() == q.data_ptr()
    _close(got_q, want_q, dtype)
    _close(got_k, want_k, dtype)


def _linear_close(got, want, dtype):
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    else:  # one rounding of a float32 sum, in another order than cuBLAS's; the
        # interpreter truncates the prologue's bf16 intermediates instead of rounding them
        atol = 4e-2 if INTERPRET and not CUDA else 2e-2
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=atol)


@pytest.fixture(params=[False, True], ids=["nkdot", "rowdot"])
def row_dot(request, monkeypatch):
    """Runs a GEMV test with one-row products multiplied both ways (``_gemv_dot``): the
    [M, N, K] product everywhere, or ROW_DOT on every kind of prologue."""
    kinds = frozenset({"plain", "norm", "silu"}) if request.param else frozenset()
    monkeypatch.setattr(fused_ops, "ROW_DOT_KINDS", kinds)
    monkeypatch.setattr(fused_ops, "ROW_DOT_WARPS", None)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 4])
# One tile (64, 80), an even tiled K (256 in the interpreter's 64 tiles), and on the GPU
# too a deep K in uneven 1024 tiles (4160).
@pytest.mark.parametrize("n,k,bias", [(24, 64, False), (37, 80, True), (16, 256, False),
                                      (8, 4160, True)])
def test_triton_gemv_matches_linear(dtype, rows, n, k, bias, row_dot):
    gen = torch.Generator().manual_seed(rows * n + k)
    x = torch.randn(rows, k, generator=gen).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(DEVICE, dtype)
    b = torch.randn(n, generator=gen).to(DEVICE, dtype) if bias else None
    want = F.linear(x.float(), w.float(), None if b is None else b.float()).to(dtype)
    got = fused_ops.linear(x, w, b, force=True)
    assert got.shape == (rows, n) and got.dtype == dtype
    _linear_close(got, want, dtype)
    # Leading axes are kept, as F.linear keeps them.
    got3 = fused_ops.linear(x.view(rows, 1, k), w, b, force=True)
    assert got3.shape == (rows, 1, n)
    torch.testing.assert_close(got3.view(rows, n), got)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("k", [96, 192])  # one tile; tiles
def test_triton_gemv_with_silu_mul_prologue(dtype, rows, k, row_dot):
    gen = torch.Generator().manual_seed(rows + k)
    n = 40
    gate_up = (2 * torch.randn(rows, 2 * k, generator=gen)).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(DEVICE, dtype)
    b = torch.randn(n, generator=gen).to(DEVICE, dtype)
    act = F.silu(gate_up[:, :k]) * gate_up[:, k:]  # rounded to dtype, as the model's op
    want = F.linear(act.float(), w.float(), b.float()).to(dtype)
    _linear_close(fused_ops.silu_mul_linear(gate_up, w, b, force=True), want, dtype)


def test_row_dot_rule():
    """ROW_DOT where measured to win: one row, 4 warps, the SiLU prologue only at 2 rows
    a program (at 8 its tile spills)."""
    if "PAGEDLLM_GEMV_ROW_DOT" in __import__("os").environ:
        pytest.skip("overridden for benchmarking")
    assert fused_ops._row_dot(1, 4, False, False) and fused_ops._row_dot(1, 4, False, True)
    assert not fused_ops._row_dot(1, 4, True, False)  # 8 rows
    assert fused_ops._row_dot(1, 4, True, False, 2) and fused_ops._row_dot(1, 4, True, False, 1)
    assert not fused_ops._row_dot(1, 8, True, False, 2)
    assert not fused_ops._row_dot(2, 4, False, False)
    assert not fused_ops._row_dot(1, 8, False, True)


def test_o_proj_over_partials_only_for_small_half_precision_weights():
    """``combine_linear_applies``: a few rows, half precision, and an o_proj of at most
    ``O_PROJ_MAX_WEIGHT_ELEMENTS`` (measured slower on Llama-8B's); ``force`` lifts the
    CUDA requirement only."""
    limit = fused_ops.O_PROJ_MAX_WEIGHT_ELEMENTS
    small = torch.empty(limit // 128, 128, dtype=torch.bfloat16)
    big = torch.empty(limit // 128 + 1, 128, dtype=torch.bfloat16)
    assert fused_ops.combine_linear_applies(1, small, force=True)
    assert fused_ops.combine_linear_applies(fused_ops.O_PROJ_MAX_ROWS, small, force=True)
    assert not fused_ops.combine_linear_applies(fused_ops.O_PROJ_MAX_ROWS + 1, small, force=True)
    assert not fused_ops.combine_linear_applies(1, big, force=True)
    assert not fused_ops.combine_linear_applies(1, small.float(), force=True)
    assert not fused_ops.combine_linear_applies(1, small)  # CPU tensors: the torch path
    if CUDA:
        assert fused_ops.combine_linear_applies(1, small.cuda()) == fused_ops.FUSED_O_PROJ
        assert not fused_ops.combine_linear_applies(1, big.cuda())


def test_gemv_only_takes_few_row_half_precision_products_on_cuda():
    w = torch.zeros(8, 16, dtype=torch.bfloat16)
    few = torch.zeros(fused_ops.GEMV_MAX_ROWS, 16, dtype=torch.bfloat16)
    many = torch.zeros(fused_ops.GEMV_MAX_ROWS + 1, 16, dtype=torch.bfloat16)
    assert not fused_ops._gemv_applies(few, w)  # CPU tensors: the torch path
    if CUDA:
        assert fused_ops._gemv_applies(few.cuda(), w.cuda())
        assert not fused_ops._gemv_applies(many.cuda(), w.cuda())
        assert not fused_ops._gemv_applies(few.cuda().float(), w.cuda().float())
        # Big weights whose K runs in tiles stay with cuBLAS (faster there, see
        # GEMV_MAX_WEIGHT_ELEMENTS); one-tile ones are ours at any size.
        for k, big_is_ours in ((16384, False), (4096, True)):
            big = torch.empty(fused_ops.GEMV_MAX_WEIGHT_ELEMENTS // k + 1, k,
                              dtype=torch.bfloat16, device="cuda")
            one = torch.zeros(1, k, dtype=torch.bfloat16, device="cuda")
            assert fused_ops._gemv_applies(one, big[:-1])
            assert fused_ops._gemv_applies(one, big) == big_is_ours


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("with_residual", [False, True])
# 96: one tile; 160: not a multiple of the interpreter's tile, so the masked tail is used.
@pytest.mark.parametrize("k", [96, 160])
def test_triton_gemv_with_rms_norm_prologue(dtype, rows, with_residual, k, row_dot):
    gen = torch.Generator().manual_seed(10 * rows + with_residual + k)
    n = 36
    x = (3 * torch.randn(rows, k, generator=gen)).to(DEVICE, dtype)
    r = torch.randn(rows, k, generator=gen).to(DEVICE, dtype) if with_residual else None
    norm_w = (1 + 0.2 * torch.randn(k, generator=gen)).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(DEVICE, dtype)
    b = torch.randn(n, generator=gen).to(DEVICE, dtype)
    stream = x + r if with_residual else x
    h = fused_ops.rms_norm_reference(stream, norm_w, 1e-6)
    want = F.linear(h.float(), w.float(), b.float()).to(dtype)
    got, got_res = fused_ops.rms_norm_linear(x, r, norm_w, 1e-6, w, b, force=True)
    assert got.shape == (rows, n)
    _linear_close(got, want, dtype)
    if with_residual:  # the new residual stream: x + r, one rounded add
        assert got_res.data_ptr() not in (x.data_ptr(), r.data_ptr())
        if CUDA or dtype == torch.float32:  # the interpreter truncates to bf16
            torch.testing.assert_close(got_res, stream, rtol=0, atol=0)
        else:
            _close(got_res, stream, dtype)
    else:
        assert got_res is x
    # The unfused path (CPU, or too many rows) gives the same pair.
    ref, ref_res = fused_ops.rms_norm_linear(x.cpu(), None if r is None else r.cpu(),
                                             norm_w.cpu(), 1e-6, w.cpu(), b.cpu())
    _linear_close(ref, want.cpu(), dtype)
    torch.testing.assert_close(ref_res, stream.cpu(), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("k", [96, 160])  # one tile; tiles (under the interpreter)
@pytest.mark.parametrize("early", [False, True], ids=["after-wait", "before-wait"])
def test_triton_gemv_gathers_embedding_rows(dtype, rows, k, early, monkeypatch):
    """With ``ids`` the input is rows of a table (the first layer's embedding): the GEMV
    gathers them itself and returns them as the residual stream, exactly; the ids read
    after the PDL wait, or (a graph's first kernel, one tile) before it."""
    if early:  # as while a CUDA graph is captured
        real = fused_ops._gather_mode
        monkeypatch.setattr(fused_ops, "_gather_mode", lambda ids, one_tile: 2 if (
            ids is not None and one_tile) else real(ids, one_tile))
    gen = torch.Generator().manual_seed(rows + k)
    table = torch.randn(50, k, generator=gen).to(DEVICE, dtype)
    ids = torch.randint(0, 50, (rows,), generator=gen).to(DEVICE)
    norm_w = (1 + 0.2 * torch.randn(k, generator=gen)).to(DEVICE, dtype)
    w = (torch.randn(36, k, generator=gen) / k**0.5).to(DEVICE, dtype)
    want, _ = fused_ops.rms_norm_linear(table[ids], None, norm_w, 1e-6, w, force=True)
    got, got_rows = fused_ops.rms_norm_linear(table, None, norm_w, 1e-6, w, force=True,
                                              ids=ids)
    assert got.shape == (rows, 36) and got_rows.data_ptr() != table.data_ptr()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got_rows, table[ids], rtol=0, atol=0)
    # The unfused path (CPU) gathers with torch and gives the same pair.
    ref, ref_rows = fused_ops.rms_norm_linear(table.cpu(), None, norm_w.cpu(), 1e-6, w.cpu(),
                                              ids=ids.cpu())
    _linear_close(ref, want.cpu(), dtype)
    torch.testing.assert_close(ref_rows, table[ids].cpu(), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rope_type", ["default", "llama3"])
def test_rotary_table_rows_equal_the_tables_computed_per_step(dtype, rope_type):
    """The fused path gathers cos/sin from a table built once; every row must be exactly the
    reference path's table for that position (rounded to dtype, held in float32), in the
    strides the fused kernels take."""
    from pagedllm.plugins.models.rope import RotaryEmbedding

    params = {"rope_type": rope_type, "rope_theta": 500000.0}
    if rope_type == "llama3":
        params.update(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=64)
    rope = RotaryEmbedding(32, params, max_positions=300)
    gen = torch.Generator().manual_seed(11)
    positions = torch.randint(0, 300, (37,), generator=gen, dtype=torch.int32).to(DEVICE)
    positions[0] = 299  # the table's last row
    cos, sin = rope.cos_sin(positions, dtype, as_float32=True)
    want_cos, want_sin = rope.cos_sin(positions, dtype)
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == (37, 1, 32)
    assert torch.equal(cos, want_cos.float()) and torch.equal(sin, want_sin.float())
    assert cos.stride(-1) == 1 and sin.stride(0) == cos.stride(0)


@pytest.mark.parametrize("k,m", [(1024, 1), (3072, 1), (4096, 4), (8192, 2), (14336, 1)])
def test_gemv_sweep_tries_the_tiling_gemv_config_would_pick(k, m):
    """``bench gemv --sweep`` sweeps one-tile configs exactly where ``gemv_config`` makes one
    tile for that many rows, each within the one-tile size; tiled ones elsewhere."""
    from pagedllm.bench.gemv import sweep_configs

    m_pad = fused_ops._next_pow2(m)
    one = fused_ops._one_tile(k, m_pad)
    assert (fused_ops.gemv_config(4096, k, m_pad)[1] >= k) == one
    configs = list(sweep_configs(k, m))
    assert configs
    for bn, bk, _, _ in configs:
        if one:
            assert bk >= k and bn * m_pad * bk <= fused_ops.ONE_TILE_MAX_ELEMENTS
        else:
            assert bk < k


def test_one_tile_rows_a_program_by_prologue():
    # Wide one-tile products: 16 weight rows a program; with the norm prologue 4 at one row
    # and K up to 2048, else 8; with the SiLU one 2 at one row (all measured in-model);
    # tiled K and narrow outputs are unchanged by them.
    assert fused_ops.gemv_config(4096, 1024, 1)[0] == 16
    assert fused_ops.gemv_config(4096, 1024, 1, normed=True)[0] == 4
    assert fused_ops.gemv_config(4096, 1024, 2, normed=True)[0] == 8
    assert fused_ops.gemv_config(4096, 4096, 1, normed=True)[0] == 8
    assert fused_ops.gemv_config(1024, 3072, 1, silu=True)[:3] == (2, 4096, 4)
    assert fused_ops.gemv_config(1024, 3072, 2, silu=True) == fused_ops.gemv_config(1024, 3072, 2)
    assert fused_ops.gemv_config(4096, 14336, 1, silu=True) == \
        fused_ops.gemv_config(4096, 14336, 1)
    assert fused_ops.gemv_config(1024, 8192, 1, normed=True) == fused_ops.gemv_config(1024, 8192, 1)
    assert fused_ops.gemv_config(4096, 14336, 1, normed=True) == \
        fused_ops.gemv_config(4096, 14336, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,n", [(1, 151936), (3, 9000), (2, 4096), (2, 37)])
def test_triton_argmax_is_torch_argmax(dtype, rows, n):
    # Several stage-1 chunks (9000 columns: 3), one, and a short row; ties broken towards
    # the first column (bf16 rounds many values equal), and a NaN counting as the maximum.
    gen = torch.Generator(device=DEVICE).manual_seed(n + rows)
    x = torch.randn(rows, n, generator=gen, device=DEVICE).to(dtype)
    x[0, n // 2] = x[0, n - 1] = x[0].max() + 1  # a tie: the first one wins
    if rows > 1:
        x[1, n // 3] = float("nan")
    if rows > 2:  # +inf before and after a NaN: the NaN wins, as in torch
        x[2, 1] = x[2, n - 2] = float("inf")
        x[2, n - 3] = float("nan")
    got = fused_ops.argmax(x, force=True)
    assert got.dtype == torch.int64 and torch.equal(got, x.argmax(dim=-1))
    assert got[0] == n // 2
    # A view with a row stride of its own.
    wide = torch.randn(rows, n + 5, generator=gen, device=DEVICE).to(dtype)[:, 2:n + 2]
    assert torch.equal(fused_ops.argmax(wide, force=True), wide.argmax(dim=-1))
    # ids_out: the same ids, int32, stored where a decode graph's next inputs are read.
    ids = torch.full((rows + 1,), -7, dtype=torch.int32, device=DEVICE)
    got = fused_ops.argmax(x, force=True, ids_out=ids[:rows])
    assert torch.equal(ids[:rows].long(), got) and ids[rows] == -7


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden,inter", [(48, 36), (64, 64)])
def test_norm_mlp_is_the_unfused_mlp(dtype, hidden, inter):
    # One launch for RMSNorm(x + r), gate/up, SiLU * up and down_proj: its float32 sum,
    # rounded, is the unfused ops' output; it returns their residual stream; it zeroes the
    # previous sum.  Then the next layer's norm and projection take that float32 sum as it
    # is and give what they give for the rounded one.  (48/36: padded hidden size and a
    # last program with masked columns.)
    gen = torch.Generator().manual_seed(hidden + inter)
    rand = lambda *s, scale=1.0: (scale * torch.randn(*s, generator=gen)).to(DEVICE, dtype)  # noqa: E731
    x, r = rand(1, hidden, scale=2.0), rand(1, hidden)
    norm_w = (1 + 0.2 * torch.randn(hidden, generator=gen)).to(DEVICE, dtype)
    w_gu, w_down = rand(2 * inter, hidden, scale=hidden**-0.5), rand(hidden, inter,
                                                                   scale=inter**-0.5)
    gate_up, stream = fused_ops.rms_norm_linear(x.cpu(), r.cpu(), norm_w.cpu(), 1e-6,
                                                w_gu.cpu())
    want = F.linear(fused_ops.silu_and_mul(gate_up).float(), w_down.cpu().float()).to(dtype)
    out = torch.zeros(1, hidden, dtype=torch.float32, device=DEVICE)
    old = torch.randn(hidden, generator=gen).to(DEVICE)
    assert fused_ops.norm_mlp_applies(x, w_gu, w_down, force=True)
    res = fused_ops.norm_mlp(x, r, norm_w, 1e-6, w_gu, w_down, out, old)
    assert not old.any()
    assert res.dtype == dtype and out.dtype == torch.float32
    _linear_close(out.to(dtype).cpu(), want, dtype)
    _close(res.cpu(), stream, dtype)
    # The next layer: its norm prologue (GEMV) and the final norm take the float32 sum.
    w_next = rand(24, hidden, scale=hidden**-0.5)
    got, got_res = fused_ops.rms_norm_linear(out, res, norm_w, 1e-6, w_next, force=True)
    ref, ref_res = fused_ops.rms_norm_linear(out.to(dtype), res, norm_w, 1e-6, w_next,
                                             force=True)
    normed, normed_res = fused_ops.rms_norm(out, norm_w, 1e-6, res, force=True)
    ref_n, ref_nres = fused_ops.rms_norm(out.to(dtype), norm_w, 1e-6, res, force=True)
    assert got.dtype == got_res.dtype == normed.dtype == dtype
    # Exact where the kernel rounds as torch does (the interpreter truncates to bf16).
    same = (lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=0)) \
        if CUDA or dtype == torch.float32 else (lambda a, b: _close(a, b, dtype))
    for a, b in ((got, ref), (got_res, ref_res), (normed, ref_n), (normed_res, ref_nres)):
        same(a, b)
    # The torch path rounds a float32 sum the same way.
    cpu_n, _ = fused_ops.rms_norm(out.cpu(), norm_w.cpu(), 1e-6, res.cpu())
    assert cpu_n.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n,k", [(1, 40, 96), (3, 37, 200), (4, 64, 64)])
def test_silu_mul_linear_sum_is_the_unfused_down_proj(dtype, rows, n, k, monkeypatch):
    # down_proj split over its input columns: its float32 sum, rounded, is silu_mul_linear's
    # output (an atomic sum in another order: close, not equal); it zeroes the given
    # buffer.  Tiles smaller than the shapes, so several column and row blocks, masked
    # edges (37 rows, 200 columns) and a zeroed buffer spread over programs.
    monkeypatch.setattr(fused_ops, "SPLIT_DOWN_BLOCK_N", 16)
    monkeypatch.setattr(fused_ops, "SPLIT_DOWN_BLOCK_K", 32)
    gen = torch.Generator().manual_seed(rows * n + k)
    gate_up = (2 * torch.randn(rows, 2 * k, generator=gen)).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(DEVICE, dtype)
    act = F.silu(gate_up[:, :k]) * gate_up[:, k:]  # rounded to dtype, as the model's op
    want = F.linear(act.float(), w.float()).to(dtype)
    out = torch.zeros(rows, n, dtype=torch.float32, device=DEVICE)
    old = torch.randn(3 * n + 5, generator=gen).to(DEVICE)
    assert fused_ops.silu_mul_linear_sum_applies(rows, w, force=True) == (dtype != torch.float32)
    got = fused_ops.silu_mul_linear_sum(gate_up, w, out, old)
    assert got is out and not old.any()
    _linear_close(out.to(dtype), want, dtype)
    with pytest.raises(ValueError, match="do not fit"):
        fused_ops.silu_mul_linear_sum(gate_up, w, out[:, :-1], old)


def test_split_down_only_for_one_row_small_half_precision_weights():
    """``silu_mul_linear_sum_applies``: one row (up to the sums' rows when forced), half
    precision, a down_proj of at most ``SPLIT_DOWN_MAX_WEIGHT_ELEMENTS`` elements."""
    small = torch.zeros(64, 32, dtype=torch.bfloat16)
    big = torch.zeros(1, fused_ops.SPLIT_DOWN_MAX_WEIGHT_ELEMENTS + 1, dtype=torch.bfloat16)
    assert fused_ops.silu_mul_linear_sum_applies(1, small, force=True)
    assert fused_ops.silu_mul_linear_sum_applies(fused_ops.O_PROJ_MAX_ROWS, small, force=True)
    assert not fused_ops.silu_mul_linear_sum_applies(fused_ops.O_PROJ_MAX_ROWS + 1, small,
                                                     force=True)
    assert not fused_ops.silu_mul_linear_sum_applies(1, big, force=True)
    assert not fused_ops.silu_mul_linear_sum_applies(1, small.float(), force=True)
    assert not fused_ops.silu_mul_linear_sum_applies(1, small)  # CPU tensors: the torch path
    if CUDA:
        assert fused_ops.silu_mul_linear_sum_applies(1, small.cuda()) == fused_ops.SPLIT_DOWN
        assert not fused_ops.silu_mul_linear_sum_applies(2, small.cuda())
        assert not fused_ops.silu_mul_linear_sum_applies(1, big.cuda())
