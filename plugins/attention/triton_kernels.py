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
  partition of the context (each sequence's length split evenly over the partitions).  The program holds every query head of that KV head's GQA group
  as rows of one tile, so each K/V tile is loaded once for the whole group.  With one
  partition it writes the final output; otherwise it writes a normalized partial output and
  its softmax max and sum, which ``decode_reduce_kernel`` combines.
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

LOG2E = tl.constexpr(1.4426950408889634)

# Integer arguments that change from step to step (token counts, block-table widths,
# split counts) are not specialized on: Triton would otherwise compile a new variant
# whenever one crosses a multiple of 16, stalling a running engine for a second or more.
# (Helpers are written inline rather than as nested @triton.jit functions: the interpreter
# re-patches triton.language on every nested call, which made CI runs several times slower.)


@triton.jit(do_not_specialize=["num_tokens"])
def write_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, num_tokens,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_cs, stride_ch,  # shared by the K and V halves of the cache
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    KVH_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
):
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


@triton.jit(do_not_specialize=["stride_bt", "write_kv"])
def decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_out_ptr, part_m_ptr, part_l_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_ptr, seq_ids_ptr,
    key_ptr, value_ptr, slot_ptr,
    # 1: write the new token's K/V first (decode-only steps, instead of write_kv_kernel).
    # A runtime flag, not a constexpr: a second compiled variant would first be needed at
    # a running engine's first mixed step and stall it for the compile (W1 lost 0.6 s so).
    write_kv,
    scale,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_cs, stride_ch, stride_bt,
    stride_kt, stride_kh, stride_vt, stride_vh,
    ONE_SPLIT: tl.constexpr,  # one partition per sequence (grid axis 2): write final output
    DENSE: tl.constexpr,  # decode i is batch row i (no seq_ids map)
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    i = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if DENSE:
        seq = i
    else:
        seq = tl.load(seq_ids_ptr + i)
    seq_len = tl.load(seq_lens_ptr + seq)
    tok = tl.load(query_start_ptr + seq).to(tl.int64)
    # Each sequence splits its own length evenly (in whole key tiles) over the grid's
    # partitions, so the split count can be fixed ahead (a CUDA graph) for any lengths.
    partition_size = tl.cdiv(tl.cdiv(seq_len, tl.num_programs(2)), BLOCK_N) * BLOCK_N
    start = split * partition_size
    end = tl.minimum(start + partition_size, seq_len)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    if write_kv != 0:
        # The one program whose partition holds the new token (the sequence's last) puts
        # its K/V in the cache, then reads them back with the rest: a decode-only step
        # needs no write kernel of its own.  A negative slot (graph padding) writes nothing.
        last = seq_len - 1
        if (start <= last) & (last < end):
            slot = tl.load(slot_ptr + tok).to(tl.int64)
            if slot >= 0:
                dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs \
                    + kv_head * stride_ch + d
                tl.store(k_cache_ptr + dst, tl.load(key_ptr + tok * stride_kt
                                                    + kv_head * stride_kh + d))
                tl.store(v_cache_ptr + dst, tl.load(value_ptr + tok * stride_vt
                                                    + kv_head * stride_vh + d))
            tl.debug_barrier()  # the whole program sees the stores before the loads below
    heads = kv_head * GROUP + g
    row_ok = g < GROUP
    q = tl.load(q_ptr + tok * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None], other=0.0)
    q = q.to(k_cache_ptr.dtype.element_ty)  # as the reference does
    if DOT_FP32:
        q = q.to(tl.float32)
    qk_scale = scale * LOG2E  # applied to float32 scores, not to q: no extra rounding
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    head_off = kv_head * stride_ch

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        valid = pos < end
        blk = tl.load(table_row + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        base = blk * stride_cb + (pos % BLOCK_SIZE) * stride_cs + head_off
        kt = tl.load(k_cache_ptr + base[None, :] + d[:, None], mask=valid[None, :], other=0.0)
        v = tl.load(v_cache_ptr + base[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        if DOT_FP32:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: position n0 is always valid
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    if ONE_SPLIT:
        o = acc / l_i[:, None]
        tl.store(out_ptr + tok * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        # An empty partition (past this sequence's end) leaves m = -inf, l = 0, out = 0.
        o = acc / tl.maximum(l_i, 1e-30)[:, None]
        # part_* are [num_decodes, num_heads, num_splits(, HEAD_DIM)], contiguous.
        num_splits = tl.num_programs(2)
        row = (i.to(tl.int64) * (GROUP * tl.num_programs(1)) + heads) * num_splits + split
        tl.store(part_m_ptr + row, m_i, mask=row_ok)
        tl.store(part_l_ptr + row, l_i, mask=row_ok)
        tl.store(part_out_ptr + row[:, None] * HEAD_DIM + d[None, :], o, mask=row_ok[:, None])


@triton.jit(do_not_specialize=["num_splits"])
def decode_reduce_kernel(
    out_ptr, part_out_ptr, part_m_ptr, part_l_ptr, query_start_ptr, seq_ids_ptr,
    num_splits, stride_ot, stride_oh,
    SPLITS_PAD: tl.constexpr, DENSE: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    i = tl.program_id(0)
    head = tl.program_id(1)
    if DENSE:
        seq = i
    else:
        seq = tl.load(seq_ids_ptr + i)
    tok = tl.load(query_start_ptr + seq).to(tl.int64)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, HEAD_DIM)
    ok = s < num_splits
    row = (i.to(tl.int64) * tl.num_programs(1) + head) * num_splits + s
    m = tl.load(part_m_ptr + row, mask=ok, other=float("-inf"))
    l = tl.load(part_l_ptr + row, mask=ok, other=0.0)
    m_max = tl.max(m, axis=0)  # finite: partition 0 always holds position 0
    w = tl.exp2(m - m_max) * l
    o = tl.load(part_out_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=ok[:, None], other=0.0)
    o = tl.sum(o * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + tok * stride_ot + head * stride_oh + d, o.to(out_ptr.dtype.element_ty))


@triton.jit(do_not_specialize=["stride_bt"])
def prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_ptr, tile_seq_ptr, tile_start_ptr,
    scale,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_cs, stride_ch, stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
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
        blk = tl.load(table_row + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        base = blk * stride_cb + (pos % BLOCK_SIZE) * stride_cs + head_off
        kt = tl.load(k_cache_ptr + base[None, :] + d[:, None], mask=valid[None, :], other=0.0)
        v = tl.load(v_cache_ptr + base[:, None] + d[None, :], mask=valid[:, None], other=0.0)
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
