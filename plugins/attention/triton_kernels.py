"""The Triton kernels behind the ``triton`` attention backend (``triton_backend.py``).

Importing this module imports Triton, so only the backend imports it, lazily, once it is
known to be usable.  Under ``TRITON_INTERPRET=1`` (set before Triton is first imported) the
same kernels run on CPU tensors, which is how CI checks them.

Cache layout is the reference one, ``[2, num_blocks, block_size, num_kv_heads, head_dim]``;
every kernel takes the K and V halves as separate pointers with their strides, so a view of
any cache with unit stride along ``head_dim`` works.

Kernels:

- ``write_kv_kernel``: copies each new token's K/V into its cache slot (``slot_mapping``);
  decode-only steps leave that to ``decode_kernel`` (its ``write_kv`` flag).
- ``decode_kernel``: flash-decoding.  One program = one decode sequence x one KV head x one
  partition of the context (each sequence's length split evenly over the partitions).  The
  program holds every query head of that KV head's GQA group as rows of one tile, so each
  K/V tile is loaded once for the whole group.  The sequence's new token is taken from the
  step's key/value (in registers, never read back from the cache), so the partition's first
  tile of older keys can be requested before the PDL wait.  With one partition it writes
  the final output; otherwise it writes a normalized partial output and its softmax max and
  sum, and the sequence's last partition to finish (an atomic counter per sequence and KV
  head) combines them, all the group's heads in one round of loads.  With ``rope`` set it
  also applies the rotary embedding (and Qwen3's q/k norm) to q and to the new key.
- ``prefill_kernel``: causal flash attention (online softmax) over paged K/V for query
  chunks that sit at the end of their context (fresh prompts, prompt chunks, prefix-cache
  hits).  One program = one tile of query tokens x one KV head, again with the group's query
  heads packed into the tile's rows (row r is token r // GROUP, head r % GROUP).

All scores, softmax statistics and accumulators are float32.  ``DOT_FP32`` makes every
``tl.dot`` take float32 operands at IEEE precision: needed for float32 inputs (Triton would
otherwise use TF32) and in the interpreter, whose bfloat16 ``tl.dot`` is wrong (Triton 3.9).
For bf16/fp16 inputs the products are exact in float32 either way, so results agree.
"""
from __future__ import annotations

import triton
import triton.language as tl

from pagedllm.pdl_kernels import pdl_start, pdl_wait  # dependent_launch's contract

LOG2E = tl.constexpr(1.4426950408889634)
COMBINE_ROWS = tl.constexpr(32)  # (head, partition) pairs per round of decode_kernel's combine

# Integer arguments that change from step to step (token counts, block-table widths,
# split counts) are not specialized on: Triton would otherwise compile a new variant
# whenever one crosses a multiple of 16, stalling a running engine for a second or more.
# (Nested @triton.jit helpers stay few and coarse: the interpreter re-patches
# triton.language on every nested call, and many small ones made CI runs several times
# slower.  On the GPU they are inlined: the decode kernels' PTX is the same either way.)


@triton.jit(do_not_specialize=["num_tokens"])
def write_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, num_tokens,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_cs, stride_ch,  # shared by the K and V halves of the cache
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    KVH_PAD: tl.constexpr, BLOCK_T: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_start(USE_PDL)
    pdl_wait(USE_PDL)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.arange(0, KVH_PAD * HEAD_DIM)  # (kv head, dim) flattened
    h = c // HEAD_DIM
    d = c % HEAD_DIM
    slot = tl.load(slot_ptr + t, mask=t < num_tokens, other=-1).to(tl.int64)
    # A negative slot marks a padding token: nothing to write.
    mask = (slot >= 0)[:, None] & (h < NUM_KV_HEADS)[None, :]
    t64 = t.to(tl.int64)[:, None]
    k = tl.load(key_ptr + t64 * stride_kt + (h * stride_kh + d)[None, :], mask=mask)
    v = tl.load(value_ptr + t64 * stride_vt + (h * stride_vh + d)[None, :], mask=mask)
    dst = ((slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs)[:, None] \
        + (h * stride_ch + d)[None, :]
    tl.store(k_cache_ptr + dst, k, mask=mask)
    tl.store(v_cache_ptr + dst, v, mask=mask)


@triton.jit
def _rows_and_partners(ptr, row_off, row_ok, d, rope, HEAD_DIM: tl.constexpr):
    """Rows ``ptr + row_off`` ([rows, HEAD_DIM]) and, with ``rope``, their rotate-half
    partners (else zeros).  Only loads: a kernel issues all of its post-wait loads (q, the
    new key and value) before it uses any, so they cost one round trip, not one each."""
    half: tl.constexpr = HEAD_DIM // 2
    partner = (d + half) % HEAD_DIM  # rotate_half(x)[d] = -x[d + half] or x[d - half]
    x = tl.load(ptr + row_off[:, None] + d[None, :], mask=row_ok[:, None], other=0.0)
    rotate = (d * 0 + rope) != 0
    xp = tl.load(ptr + row_off[:, None] + partner[None, :],
                 mask=row_ok[:, None] & rotate[None, :], other=0.0)
    return x, xp


@triton.jit
def _rotate(x, xp, d, cos, sin, w, wp, eps, qk_norm, HEAD_DIM: tl.constexpr):
    """Rows ``x`` (partners ``xp``, ``_rows_and_partners``) rotated as ``RotaryInputs``
    defines, with ``qk_norm`` RMS-normed first (weights ``w``, partners ``wp``), in float32
    holding values rounded to x's dtype (as ``fused_ops.rotary`` rounds)."""
    dtype = x.dtype
    half: tl.constexpr = HEAD_DIM // 2
    x = x.to(tl.float32)
    xp = xp.to(tl.float32)
    if qk_norm:
        s = tl.math.rsqrt(tl.sum(x * x, axis=1) / HEAD_DIM + eps)[:, None]
        x = (w * (x * s).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        xp = (wp * (xp * s).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    sign = tl.where(d < half, -1.0, 1.0)[None, :]
    o = (x * cos).to(dtype).to(tl.float32) + (sign * xp * sin).to(dtype).to(tl.float32)
    return o.to(dtype)


@triton.jit
def _load_kv_tile(k_cache_ptr, v_cache_ptr, table_row, pos, ok, d, head_off,
                  stride_cb, stride_cs, BLOCK_SIZE: tl.constexpr):
    """The K tile ([HEAD_DIM, keys], transposed for q @ k) and V tile ([keys, HEAD_DIM]) of
    one KV head at cache positions ``pos`` (``ok``: the real ones; the rest read as 0)."""
    blk = tl.load(table_row + pos // BLOCK_SIZE, mask=ok, other=0).to(tl.int64)
    base = blk * stride_cb + (pos % BLOCK_SIZE) * stride_cs + head_off
    kt = tl.load(k_cache_ptr + base[None, :] + d[:, None], mask=ok[None, :], other=0.0)
    v = tl.load(v_cache_ptr + base[:, None] + d[None, :], mask=ok[:, None], other=0.0)
    return kt, v


@triton.jit
def _attend_tile(q, kt, v, ok, m_i, l_i, acc, qk_scale,
                 DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One online-softmax step of decode attention over a key tile (``ok``: its real keys)."""
    if DOT_FP32:
        kt = kt.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
    s = tl.where(ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: see decode_kernel
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _decode_partition(i, seq_ids_ptr, seq_lens_ptr, query_start_ptr, DENSE: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """(sequence, its length, its token's row, partition size, this partition's first key)
    of decode ``i`` and the program's partition (grid axis 2).

    Each sequence splits its own length evenly (in whole key tiles) over the grid's
    partitions, so the split count can be fixed ahead (a CUDA graph) for any lengths;
    partitions past its end have nothing to do (a graph's split count suits the longest
    possible sequence, so most do nothing)."""
    if DENSE:
        seq = i
    else:
        seq = tl.load(seq_ids_ptr + i)
    seq_len = tl.load(seq_lens_ptr + seq)
    tok = tl.load(query_start_ptr + seq).to(tl.int64)
    partition_size = tl.cdiv(tl.cdiv(seq_len, tl.num_programs(2)), BLOCK_N) * BLOCK_N
    return seq, seq_len, tok, partition_size, tl.program_id(2) * partition_size


@triton.jit
def _norm_weights(norm_w_ptr, d, qk_norm, HEAD_DIM: tl.constexpr):
    """A q/k norm's weights and their rotate-half partners ([1, HEAD_DIM] float32; zeros,
    nothing read, without ``qk_norm``)."""
    half: tl.constexpr = HEAD_DIM // 2
    has_norm = (d * 0 + qk_norm) != 0
    w = tl.load(norm_w_ptr + d, mask=has_norm, other=0.0).to(tl.float32)[None, :]
    wp = tl.load(norm_w_ptr + (d + half) % HEAD_DIM, mask=has_norm, other=0.0)
    return w, wp.to(tl.float32)[None, :]


@triton.jit
def _rope_cos_sin(cos_ptr, sin_ptr, rope, tok, seq_len, stride_ct, d):
    """The decode token's cos and sin rows ([1, HEAD_DIM] float32; nothing read without
    rotary): row ``tok`` of per-token tables, or with ``rope & 4`` (``RotaryInputs
    .by_position``) row ``seq_len - 1``, its position, of tables over positions."""
    row = tl.where((rope & 4) != 0, seq_len - 1, tok).to(tl.int64)
    has_rope = (d * 0 + rope) != 0  # masks that read nothing without rotary
    cos = tl.load(cos_ptr + row * stride_ct + d, mask=has_rope, other=0.0)[None, :]
    sin = tl.load(sin_ptr + row * stride_ct + d, mask=has_rope, other=0.0)[None, :]
    return cos, sin


@triton.jit
def _rope_inputs(cos_ptr, sin_ptr, q_norm_ptr, k_norm_ptr, rope, tok, seq_len, stride_ct, d,
                 HEAD_DIM: tl.constexpr):
    """What rotating the decode token's q and k takes that no kernel of the step writes,
    so it is read before the PDL wait: its cos and sin rows ([1, HEAD_DIM] float32) -- row
    ``tok`` of per-token tables, or with ``rope & 4`` (``RotaryInputs.by_position``) row
    ``seq_len - 1``, its position, of tables over positions -- and with q/k norms
    (``rope & 3 == 2``) their weights and the weights' rotate-half partners (float32).
    Nothing is read that ``rope`` does not use (zeros instead)."""
    cos, sin = _rope_cos_sin(cos_ptr, sin_ptr, rope, tok, seq_len, stride_ct, d)
    wq, wqp = _norm_weights(q_norm_ptr, d, (rope & 3) == 2, HEAD_DIM)
    wk, wkp = _norm_weights(k_norm_ptr, d, (rope & 3) == 2, HEAD_DIM)
    return cos, sin, wq, wqp, wk, wkp


@triton.jit
def _new_token_kv(kx, kxp, vx, k_cache_ptr, v_cache_ptr, kv_head, slot, d, cos, sin, wk, wkp,
                  norm_eps, rope, stride_cb, stride_cs, stride_ch,
                  BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr):
    """The step's new key ([1, HEAD_DIM], rotated with ``rope``) and value ([HEAD_DIM]) of one
    KV head, in the cache's dtype, from its rows as loaded (``kx``, ``kxp``, ``vx``);
    stored at ``slot`` unless it is negative (no write_kv, graph padding, or another
    program's job).  No store is read back, so no barrier."""
    if rope != 0:
        k_new = _rotate(kx, kxp, d, cos, sin, wk, wkp, norm_eps, (rope & 3) == 2, HEAD_DIM)
    else:
        k_new = kx
    k_new = k_new.to(k_cache_ptr.dtype.element_ty)
    v_new = vx.to(v_cache_ptr.dtype.element_ty)
    if slot >= 0:
        dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs \
            + kv_head * stride_ch + d
        tl.store(k_cache_ptr + dst[None, :], k_new)
        tl.store(v_cache_ptr + dst, v_new)
    return k_new, v_new


@triton.jit
def _rope_rows(ptr, row_off, row_ok, d, cos, sin, norm_w_ptr, eps, qk_norm,
               HEAD_DIM: tl.constexpr):
    """Rows ``ptr + row_off`` loaded and rotated in one go, the norm's weights read only
    then: ``decode_kernel``'s order (see there).  The same loads and arithmetic as
    ``_rows_and_partners`` and ``_rotate``, kept apart because the kernel compiled from
    them is the one measured (W6 B=128: 501 us; composed of those two, ptxas gives it
    other code, not yet measured)."""
    dtype = ptr.dtype.element_ty
    half: tl.constexpr = HEAD_DIM // 2
    partner = (d + half) % HEAD_DIM  # rotate_half(x)[d] = -x[d + half] or x[d - half]
    x = tl.load(ptr + row_off[:, None] + d[None, :], mask=row_ok[:, None], other=0.0)
    xp = tl.load(ptr + row_off[:, None] + partner[None, :], mask=row_ok[:, None], other=0.0)
    x = x.to(tl.float32)
    xp = xp.to(tl.float32)
    if qk_norm != 0:
        s = tl.math.rsqrt(tl.sum(x * x, axis=1) / HEAD_DIM + eps)[:, None]
        w = tl.load(norm_w_ptr + d).to(tl.float32)[None, :]
        wp = tl.load(norm_w_ptr + partner).to(tl.float32)[None, :]
        x = (w * (x * s).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        xp = (wp * (xp * s).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    sign = tl.where(d < half, -1.0, 1.0)[None, :]
    o = (x * cos).to(dtype).to(tl.float32) + (sign * xp * sin).to(dtype).to(tl.float32)
    return o.to(dtype)


@triton.jit
def _load_new_token_kv(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, tok, kv_head, slot, d,
                       cos, sin, k_norm_ptr, norm_eps, rope,
                       stride_kt, stride_kh, stride_vt, stride_vh, stride_cb, stride_cs,
                       stride_ch, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr):
    """``_new_token_kv`` that loads the new key and value itself, once called: in
    ``decode_kernel`` that is after q is rotated (see there on why)."""
    if rope != 0:
        one = tl.arange(0, 1)
        k = _rope_rows(key_ptr + tok * stride_kt, one * 0 + kv_head * stride_kh, one == 0, d,
                       cos, sin, k_norm_ptr, norm_eps, (rope & 3) == 2, HEAD_DIM)
    else:
        k = tl.load(key_ptr + tok * stride_kt + kv_head * stride_kh + d)[None, :]
    v = tl.load(value_ptr + tok * stride_vt + kv_head * stride_vh + d)
    # Rotated already: _new_token_kv (rope 0) casts and stores it.
    return _new_token_kv(k, k, v, k_cache_ptr, v_cache_ptr, kv_head, slot, d, cos, sin, cos,
                         sin, norm_eps, 0, stride_cb, stride_cs, stride_ch, BLOCK_SIZE,
                         HEAD_DIM)


@triton.jit
def _last_to_finish(counter, seq_len, partition_size):
    """Whether this program is the last of its sequence's partitions to finish (their
    partials stored), counted on ``counter``, which the last one resets for the next step
    (relaxed: the kernel boundary orders it).  Every thread's stores precede the barrier,
    the barrier precedes the release-acquire increment; the combiner must read the partials
    past L1 (.cg), which may hold lines of an earlier step."""
    tl.debug_barrier()
    ticket = tl.atomic_add(counter, 1, sem="acq_rel")
    last = ticket == tl.cdiv(seq_len, partition_size) - 1
    if last:
        tl.atomic_xchg(counter, 0, sem="relaxed")
    return last


@triton.jit(do_not_specialize=["stride_bt", "write_kv", "rope"])
def decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_out_ptr, part_m_ptr, part_l_ptr,
    counter_ptr, block_tables_ptr, seq_lens_ptr, query_start_ptr, seq_ids_ptr,
    key_ptr, value_ptr, slot_ptr,
    # 1: write the new token's K/V into the cache (decode-only steps, instead of
    # write_kv_kernel).  A runtime flag, not a constexpr: a second compiled variant would
    # first be needed at a running engine's first mixed step and stall it for the compile
    # (W1 lost 0.6 s so).
    write_kv,
    # 1: q and k arrive unrotated (RotaryInputs): rotate them here; 2: with q/k norms.
    # Runtime values, not constexprs, for the reason write_kv is one: mixed steps (rope 0)
    # and decode-only ones (rope 1 or 2) then share one compiled variant.  + 4: cos/sin
    # are tables over positions (RotaryInputs.by_position), see _rope_cos_sin.
    rope,
    cos_ptr, sin_ptr, q_norm_ptr, k_norm_ptr, norm_eps, stride_ct,  # rope only
    scale,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_cs, stride_ch, stride_bt,
    stride_kt, stride_kh, stride_vt, stride_vh,
    ONE_SPLIT: tl.constexpr,  # one partition per sequence (grid axis 2): write final output
    DENSE: tl.constexpr,  # decode i is batch row i (no seq_ids map)
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, GROUP_P2: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_start(USE_PDL)
    i = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    # Before the PDL wait only what no kernel of the last two wrote: the step's metadata
    # (copied in before the step's first kernel), the rotary tables (the step's first
    # kernels) and the cached keys before the new token (earlier steps).  So the first key
    # tile is on its way while the qkv projection ends.
    seq, seq_len, tok, partition_size, start = _decode_partition(
        i, seq_ids_ptr, seq_lens_ptr, query_start_ptr, DENSE, BLOCK_N)
    if start < seq_len:
        end = tl.minimum(start + partition_size, seq_len)
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, HEAD_DIM)
        heads = kv_head * GROUP + g
        row_ok = g < GROUP
        cos, sin = _rope_cos_sin(cos_ptr, sin_ptr, rope, tok, seq_len, stride_ct, d)
        last = seq_len - 1  # the step's new token; this partition holds it if last < end
        slot = tl.load(slot_ptr + tok, mask=(write_kv != 0) & (last < end), other=-1
                       ).to(tl.int64)
        table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
        head_off = kv_head * stride_ch
        # The new token never comes from the cache (it comes from key/value below), so
        # the tiles cover the keys before it, all written by earlier steps.
        old_end = tl.minimum(end, last)
        pos = start + tl.arange(0, BLOCK_N)
        ok = pos < old_end
        kt, v = _load_kv_tile(k_cache_ptr, v_cache_ptr, table_row, pos, ok, d, head_off,
                              stride_cb, stride_cs, BLOCK_SIZE)
        pdl_wait(USE_PDL)
        # q first, the new token's key and value after it: unlike decode_head_kernel,
        # which requests them together, this kernel measured slower so (W6 B=128, ctx
        # 4096, H200: 593 against 501 us).
        if rope != 0:
            q = _rope_rows(q_ptr + tok * stride_qt, heads * stride_qh, row_ok, d, cos, sin,
                           q_norm_ptr, norm_eps, (rope & 3) == 2, HEAD_DIM)
        else:
            q = tl.load(q_ptr + tok * stride_qt + heads[:, None] * stride_qh + d[None, :],
                        mask=row_ok[:, None], other=0.0)
        q = q.to(k_cache_ptr.dtype.element_ty)  # as the reference does
        if DOT_FP32:
            q = q.to(tl.float32)
        qk_scale = scale * LOG2E  # applied to float32 scores, not to q: no extra rounding

        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        if last < end:
            # The new token, straight from the step's key/value (rotated here with rope):
            # its score and value open this partition's softmax, and with write_kv it is
            # stored in the cache for later steps.
            k_new, v_new = _load_new_token_kv(
                key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, tok, kv_head, slot, d, cos, sin,
                k_norm_ptr, norm_eps, rope, stride_kt, stride_kh, stride_vt, stride_vh,
                stride_cb, stride_cs, stride_ch, BLOCK_SIZE, HEAD_DIM)
            m_i = tl.sum(q.to(tl.float32) * k_new.to(tl.float32), axis=1) * qk_scale
            l_i += 1.0
            acc += v_new.to(tl.float32)[None, :]
        # Every tile's softmax max is finite: a partition without the new token has its
        # first key in its first tile, one with it starts from the new token's score.
        m_i, l_i, acc = _attend_tile(q, kt, v, ok, m_i, l_i, acc, qk_scale, DOT_FP32,
                                     DOT_PRECISION)
        for n0 in range(start + BLOCK_N, old_end, BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)
            ok = pos < old_end
            kt, v = _load_kv_tile(k_cache_ptr, v_cache_ptr, table_row, pos, ok, d, head_off,
                                  stride_cb, stride_cs, BLOCK_SIZE)
            m_i, l_i, acc = _attend_tile(q, kt, v, ok, m_i, l_i, acc, qk_scale, DOT_FP32,
                                         DOT_PRECISION)

        o = acc / l_i[:, None]
        if ONE_SPLIT:
            tl.store(out_ptr + tok * stride_ot + heads[:, None] * stride_oh + d[None, :],
                     o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
        else:
            # A normalized partial output and its softmax max and sum; part_* are
            # [num_decodes, num_heads, num_splits(, HEAD_DIM)], contiguous.
            num_splits = tl.num_programs(2)
            row = (i.to(tl.int64) * (GROUP * tl.num_programs(1)) + heads) * num_splits + split
            tl.store(part_m_ptr + row, m_i, mask=row_ok)
            tl.store(part_l_ptr + row, l_i, mask=row_ok)
            tl.store(part_out_ptr + row[:, None] * HEAD_DIM + d[None, :], o,
                     mask=row_ok[:, None])
            # The last of this (sequence, KV head)'s partitions to finish combines them:
            # no reduce kernel.
            used = tl.cdiv(seq_len, partition_size)
            if _last_to_finish(counter_ptr + i * tl.num_programs(1) + kv_head, seq_len,
                               partition_size):
                # All the group's heads at once, partitions in chunks with a running max:
                # up to COMBINE_ROWS // GROUP_P2 partitions take one round of loads.
                CHUNK: tl.constexpr = COMBINE_ROWS // GROUP_P2
                hg = tl.arange(0, GROUP_P2)
                h_ok = hg < GROUP
                hrow = (i.to(tl.int64) * (GROUP * tl.num_programs(1)) + kv_head * GROUP + hg) \
                    * num_splits
                m_run = tl.full([GROUP_P2], float("-inf"), tl.float32)
                w_sum = tl.zeros([GROUP_P2], tl.float32)
                comb = tl.zeros([GROUP_P2, HEAD_DIM], tl.float32)
                for c0 in range(0, used, CHUNK):
                    c = c0 + tl.arange(0, CHUNK)
                    cok = h_ok[:, None] & (c < used)[None, :]
                    idx = hrow[:, None] + c[None, :]
                    cm = tl.load(part_m_ptr + idx, mask=cok, other=float("-inf"),
                                 cache_modifier=".cg")
                    cl = tl.load(part_l_ptr + idx, mask=cok, other=0.0, cache_modifier=".cg")
                    po = tl.load(part_out_ptr + idx[:, :, None] * HEAD_DIM + d[None, None, :],
                                 mask=cok[:, :, None], other=0.0, cache_modifier=".cg")
                    # finite for real heads: partition 0 is in the first chunk
                    m_new = tl.where(h_ok, tl.maximum(m_run, tl.max(cm, axis=1)), 0.0)
                    a = tl.exp2(m_run - m_new)
                    wt = tl.exp2(cm - m_new[:, None]) * cl
                    comb = comb * a[:, None] + tl.sum(po * wt[:, :, None], axis=1)
                    w_sum = w_sum * a + tl.sum(wt, axis=1)
                    m_run = m_new
                out_heads = kv_head * GROUP + hg
                tl.store(out_ptr + tok * stride_ot + out_heads[:, None] * stride_oh
                         + d[None, :], (comb / w_sum[:, None]).to(out_ptr.dtype.element_ty),
                         mask=h_ok[:, None])


@triton.jit
def _load_head_tile(k_cache_ptr, v_cache_ptr, table_row, n0, kv_end, d, head_off,
                    stride_cb, stride_cs, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """K and V tiles ([keys, HEAD_DIM], both untransposed) of one KV head at cache positions
    ``n0 + arange(BLOCK_N)``, and which of them are before ``kv_end`` (the rest read 0)."""
    pos = n0 + tl.arange(0, BLOCK_N)
    ok = pos < kv_end
    blk = tl.load(table_row + pos // BLOCK_SIZE, mask=ok, other=0).to(tl.int64)
    base = (blk * stride_cb + (pos % BLOCK_SIZE) * stride_cs + head_off)[:, None] + d[None, :]
    k = tl.load(k_cache_ptr + base, mask=ok[:, None], other=0.0)
    v = tl.load(v_cache_ptr + base, mask=ok[:, None], other=0.0)
    return k, v, ok


@triton.jit
def _attend_head_tile(q, k, v, ok, m_i, l_i, acc, qk_scale):
    """One online-softmax step for one query head (``q``: [1, HEAD_DIM] float32) over a
    key tile, without tl.dot: products summed along rows, in float32."""
    s = tl.sum(k.to(tl.float32) * q, axis=1) * qk_scale  # [BLOCK_N]
    s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=0))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=0)
    acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)[None, :]
    return m_new, l_i, acc


@triton.jit(do_not_specialize=["stride_bt", "write_kv", "rope"])
def decode_head_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_out_ptr, part_m_ptr, part_l_ptr,
    counter_ptr, block_tables_ptr, seq_lens_ptr, query_start_ptr, seq_ids_ptr,
    key_ptr, value_ptr, slot_ptr, write_kv, rope,
    cos_ptr, sin_ptr, q_norm_ptr, k_norm_ptr, norm_eps, stride_ct,
    scale,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_cs, stride_ch, stride_bt,
    stride_kt, stride_kh, stride_vt, stride_vh,
    ONE_SPLIT: tl.constexpr, DENSE: tl.constexpr, GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_PDL: tl.constexpr,
    # False only in a profiling run (``bench latency --ablate combine``): the partials are
    # stored and never combined, so the output is garbage and the step shows the combine's cost.
    COMBINE: tl.constexpr = True,
):
    """``decode_kernel`` for small batches: one program = one decode sequence x one *query*
    head x one partition, meant for one warp.  Every reduction (scores over head_dim,
    softmax over keys, the q/k norms, the combine) then stays inside the warp, as shuffles,
    where the group-tile kernel's tl.dot operand shuffles and cross-warp reductions cost a
    chain of CTA barriers after the PDL wait.  The group's heads read the same K/V tile
    (the second read hits L2): at small batches the step is latency-bound, not DRAM-bound.
    Same arguments, rounding and partial/combine protocol as ``decode_kernel``, with the
    counters per (sequence, query head); no tl.dot, so float32 needs no special case."""
    pdl_start(USE_PDL)
    i = tl.program_id(0)
    head = tl.program_id(1)
    split = tl.program_id(2)
    kv_head = head // GROUP
    seq, seq_len, tok, partition_size, start = _decode_partition(
        i, seq_ids_ptr, seq_lens_ptr, query_start_ptr, DENSE, BLOCK_N)
    if start < seq_len:
        end = tl.minimum(start + partition_size, seq_len)
        d = tl.arange(0, HEAD_DIM)
        one = tl.arange(0, 1)
        cos, sin, wq, wqp, wk, wkp = _rope_inputs(cos_ptr, sin_ptr, q_norm_ptr, k_norm_ptr,
                                                  rope, tok, seq_len, stride_ct, d, HEAD_DIM)
        last = seq_len - 1
        has_new = last < end
        # Only the group's first head stores the new token's K/V (all of them compute it).
        slot = tl.load(slot_ptr + tok, mask=(write_kv != 0) & has_new & (head % GROUP == 0),
                       other=-1).to(tl.int64)
        table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
        head_off = kv_head * stride_ch
        old_end = tl.minimum(end, last)
        k, v, ok = _load_head_tile(k_cache_ptr, v_cache_ptr, table_row, start, old_end, d,
                                   head_off, stride_cb, stride_cs, BLOCK_SIZE, BLOCK_N)
        pdl_wait(USE_PDL)
        # q and (its partition's) new key and value in one round of loads, as in
        # decode_kernel: the new token's partition no longer waits a second round trip.
        qx, qxp = _rows_and_partners(q_ptr + tok * stride_qt, one * 0 + head * stride_qh,
                                     one == 0, d, rope, HEAD_DIM)
        kx, kxp = _rows_and_partners(key_ptr + tok * stride_kt, one * 0 + kv_head * stride_kh,
                                     one < has_new.to(tl.int32), d, rope, HEAD_DIM)
        vx = tl.load(value_ptr + tok * stride_vt + kv_head * stride_vh + d,
                     mask=d < has_new.to(tl.int32) * HEAD_DIM, other=0.0)
        if rope != 0:
            q = _rotate(qx, qxp, d, cos, sin, wq, wqp, norm_eps, (rope & 3) == 2, HEAD_DIM)
        else:
            q = qx
        q = q.to(k_cache_ptr.dtype.element_ty).to(tl.float32)  # [1, HEAD_DIM]
        qk_scale = scale * LOG2E

        m_i = tl.max(tl.full([1], float("-inf"), tl.float32), axis=0)
        l_i = tl.sum(tl.zeros([1], tl.float32), axis=0)
        acc = tl.zeros([1, HEAD_DIM], tl.float32)
        if has_new:
            k_new, v_new = _new_token_kv(
                kx, kxp, vx, k_cache_ptr, v_cache_ptr, kv_head, slot, d, cos, sin, wk, wkp,
                norm_eps, rope, stride_cb, stride_cs, stride_ch, BLOCK_SIZE, HEAD_DIM)
            m_i = tl.sum(tl.sum(q * k_new.to(tl.float32), axis=1), axis=0) * qk_scale
            l_i = l_i + 1.0
            acc += v_new.to(tl.float32)[None, :]
        # The partition's first tile holds its first key unless the new token opened it
        # (see decode_kernel): the running max stays finite.
        m_i, l_i, acc = _attend_head_tile(q, k, v, ok, m_i, l_i, acc, qk_scale)
        # Meant for partitions of one tile (the backend picks this kernel for short
        # contexts): a longer one waits a DRAM round trip a tile here.  Keeping the next
        # tile in flight cost more at one tile (217 registers; W2 0.646 against 0.630 ms,
        # measured together with the 8-row normed GEMVs, which alone measured 0.620).
        for n0 in range(start + BLOCK_N, old_end, BLOCK_N):
            k, v, ok = _load_head_tile(k_cache_ptr, v_cache_ptr, table_row, n0, old_end, d,
                                       head_off, stride_cb, stride_cs, BLOCK_SIZE, BLOCK_N)
            m_i, l_i, acc = _attend_head_tile(q, k, v, ok, m_i, l_i, acc, qk_scale)

        o = acc / l_i
        if ONE_SPLIT:
            tl.store(out_ptr + tok * stride_ot + head * stride_oh + d[None, :],
                     o.to(out_ptr.dtype.element_ty))
        else:
            num_splits = tl.num_programs(2)
            row = (i.to(tl.int64) * tl.num_programs(1) + head) * num_splits
            tl.store(part_m_ptr + row + split, m_i)
            tl.store(part_l_ptr + row + split, l_i)
            tl.store(part_out_ptr + (row + split) * HEAD_DIM + d[None, :], o)
            used = tl.cdiv(seq_len, partition_size)
            if COMBINE and _last_to_finish(counter_ptr + i * tl.num_programs(1) + head,
                                           seq_len, partition_size):
                m_run = tl.max(tl.full([1], float("-inf"), tl.float32), axis=0)
                w_sum = tl.sum(tl.zeros([1], tl.float32), axis=0)
                comb = tl.zeros([HEAD_DIM], tl.float32)
                # COMBINE_ROWS partitions a round, whatever the split count: a constexpr
                # that followed it would compile a variant per count (eager steps vary it).
                for c0 in range(0, used, COMBINE_ROWS):
                    c = c0 + tl.arange(0, COMBINE_ROWS)
                    cok = c < used
                    cm = tl.load(part_m_ptr + row + c, mask=cok, other=float("-inf"),
                                 cache_modifier=".cg")
                    cl = tl.load(part_l_ptr + row + c, mask=cok, other=0.0,
                                 cache_modifier=".cg")
                    po = tl.load(part_out_ptr + (row + c)[:, None] * HEAD_DIM + d[None, :],
                                 mask=cok[:, None], other=0.0, cache_modifier=".cg")
                    m_new = tl.maximum(m_run, tl.max(cm, axis=0))  # partition 0: chunk 0
                    a = tl.exp2(m_run - m_new)
                    wt = tl.exp2(cm - m_new) * cl
                    comb = comb * a + tl.sum(po * wt[:, None], axis=0)
                    w_sum = w_sum * a + tl.sum(wt, axis=0)
                    m_run = m_new
                tl.store(out_ptr + tok * stride_ot + head * stride_oh + d,
                         (comb / w_sum).to(out_ptr.dtype.element_ty))


@triton.jit(do_not_specialize=["stride_bt"])
def prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_ptr, tile_seq_ptr, tile_start_ptr,
    scale,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_cs, stride_ch, stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_start(USE_PDL)
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    pdl_wait(USE_PDL)
    seq = tl.load(tile_seq_ptr + tile)
    q0 = tl.load(tile_start_ptr + tile)  # first query token of this tile, within the sequence
    q_begin = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_begin
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len

    r = tl.arange(0, BLOCK_M)
    d = tl.arange(0, HEAD_DIM)
    t = q0 + r // GROUP  # query token within the sequence
    heads = kv_head * GROUP + r % GROUP
    row_ok = (r < BLOCK_Q * GROUP) & (t < q_len)
    tok = (q_begin + t).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None], other=0.0)
    q = q.to(k_cache_ptr.dtype.element_ty)  # as the reference does
    if DOT_FP32:
        q = q.to(tl.float32)
    qk_scale = scale * LOG2E  # applied to float32 scores, not to q: no extra rounding
    q_pos = context + t  # every row, padded ones too, has q_pos >= 0: no row is all -inf
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    head_off = kv_head * stride_ch

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # Keys before the tile's first query position are visible to every row and exist: the
    # first loop needs no masks.  The second covers the diagonal (and the sequence's end).
    first_q_pos = context + q0
    full_end = (first_q_pos // BLOCK_N) * BLOCK_N
    kv_end = tl.minimum(first_q_pos + BLOCK_Q, seq_len)
    for n0 in range(0, full_end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        blk = tl.load(table_row + pos // BLOCK_SIZE).to(tl.int64)
        base = blk * stride_cb + (pos % BLOCK_SIZE) * stride_cs + head_off
        kt = tl.load(k_cache_ptr + base[None, :] + d[:, None])
        v = tl.load(v_cache_ptr + base[:, None] + d[None, :])
        if DOT_FP32:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    for n0 in range(full_end, kv_end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        valid = pos < kv_end
        kt, v = _load_kv_tile(k_cache_ptr, v_cache_ptr, table_row, pos, valid, d, head_off,
                              stride_cb, stride_cs, BLOCK_SIZE)
        if DOT_FP32:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        s = tl.where((pos[None, :] <= q_pos[:, None]) & valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: position 0 is in the first tile
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    o = acc / l_i[:, None]
    tl.store(out_ptr + tok[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


# The interpreter wraps kernels in its own class; it needs DOT_FP32 (see the module docstring).
INTERPRETED = type(write_kv_kernel).__name__ == "InterpretedFunction"
