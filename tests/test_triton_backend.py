"""The ``triton`` attention backend against the ``torch`` reference, kernel by kernel and on a
whole model.

Triton kernels run on a CUDA GPU, or on the CPU in Triton's interpreter when
``TRITON_INTERPRET=1`` is set *before Triton is first imported in the process*.  So:

- run with ``TRITON_INTERPRET=1`` already set (or on a GPU), the checks below run in-process;
- run plainly on a CPU (CI), ``test_interpreted_checks_pass`` starts one subprocess with the
  variable set, which runs this module's checks and the shared conformance test
  (``test_attention_conformance.py``) for ``triton`` there, and reports its result.  The
  variable is never set inside this process, where it would leak into other test modules.

Interpreted shapes are tiny (the interpreter is slow).  The ``gpu``-marked tests run the
same comparison on real shapes: head_dim 64/128, GQA groups 1-8, block sizes 16/32 and
contexts to 32k tokens.
"""
from __future__ import annotations

import importlib.util
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pagedllm.attention import AttentionMetadata
from pagedllm.plugins.attention.torch_backend import TorchAttentionBackend
from pagedllm.plugins.attention.triton_backend import TritonAttentionBackend, interpreting
from paged_tables import shuffled_block_tables

HAVE_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = interpreting()
CUDA = torch.cuda.is_available()
# Where the kernels run in this process, if anywhere.
DEVICE = torch.device("cpu") if INTERPRET else torch.device("cuda" if CUDA else "cpu")
RUNS_HERE = HAVE_TRITON and (INTERPRET or CUDA)
needs_kernels = pytest.mark.skipif(
    not RUNS_HERE, reason="triton kernels need a CUDA device or TRITON_INTERPRET=1 (see "
                          "test_interpreted_checks_pass)")
TESTS = Path(__file__).resolve().parent

# Output against the torch backend on the same inputs (both round to the same dtype).
TOLERANCE = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=5e-3, rtol=5e-3),
    torch.bfloat16: dict(atol=4e-2, rtol=4e-2),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- building a step ---------------------------------------------------------------------

def make_step(seqs: list[tuple[int, int]], num_heads: int, num_kv_heads: int, head_dim: int,
              block_size: int, dtype: torch.dtype, device: torch.device, seed: int,
              extra_blocks: int = 3):
    """One step over a paged cache: ``seqs`` are (cached context, new tokens) in batch order.

    Block tables are shuffled and non-contiguous, every slot holds finite garbage, and each
    sequence's context K/V is already in its slots.  Returns (q, k, v, kv_cache, metadata).
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    rng = random.Random(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device).to(dtype)

    tables, num_blocks = shuffled_block_tables(rng, [c + n for c, n in seqs], block_size,
                                               extra_blocks)
    cache = randn(*TorchAttentionBackend.kv_cache_shape(
        num_blocks, block_size, num_kv_heads, head_dim)) * 3
    cached, slots = [], []
    for (context, new), table in zip(seqs, tables):
        pos = torch.arange(context + new)
        seq_slots = torch.tensor(table)[pos // block_size] * block_size + pos % block_size
        cached.append(seq_slots[:context])
        slots.append(seq_slots[context:])
    cached = torch.cat(cached).to(device)
    cache.view(2, -1, num_kv_heads, head_dim)[:, cached] = randn(
        2, len(cached), num_kv_heads, head_dim)
    qlens = [n for _, n in seqs]
    lens = [c + n for c, n in seqs]
    width = max(len(t) for t in tables)
    qsl = [0]
    for n in qlens:
        qsl.append(qsl[-1] + n)
    md = AttentionMetadata(
        slot_mapping=torch.cat(slots).to(device),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables],
                                  dtype=torch.int32, device=device),
        max_query_len=max(qlens), max_seq_len=max(lens),
        query_lens_host=qlens, seq_lens_host=lens,
    )
    t = qsl[-1]
    q = randn(t, num_heads, head_dim)
    k = randn(t, num_kv_heads, head_dim)
    v = randn(t, num_kv_heads, head_dim)
    return q, k, v, cache, md


def check_against_torch(seqs, num_heads, num_kv_heads, head_dim, block_size, dtype, seed,
                        device=DEVICE, tune=None, reference_fp32=False):
    """Run the triton and torch backends on the same step; compare outputs and caches."""
    q, k, v, cache, md = make_step(seqs, num_heads, num_kv_heads, head_dim, block_size,
                                   dtype, device, seed)
    scale = random.Random(seed).uniform(0.5, 1.5) * head_dim**-0.5
    triton_be = TritonAttentionBackend(num_heads, num_kv_heads, head_dim, scale)
    for name, value in (tune or {}).items():
        setattr(triton_be, name, value)
    torch_be = TorchAttentionBackend(num_heads, num_kv_heads, head_dim, scale)
    ref_dtype = torch.float32 if reference_fp32 else dtype
    ref_cache = cache.to(ref_dtype, copy=True)
    expected = torch_be.forward(q.to(ref_dtype), k.to(ref_dtype), v.to(ref_dtype), ref_cache,
                                md)
    got_cache = cache.clone()
    got = triton_be.forward(q, k, v, got_cache, md)
    assert got.shape == q.shape and got.dtype == dtype and got.device == q.device
    tolerance = dict(TOLERANCE[dtype])
    if reference_fp32 and dtype == torch.float32:  # long sums, summed in another order
        tolerance = dict(atol=1e-4, rtol=1e-4)
    start = 0
    for i, (context, n) in enumerate(seqs):
        torch.testing.assert_close(
            got[start: start + n].float(), expected[start: start + n].float(),
            **tolerance,
            msg=lambda m: f"sequence {i} (context {context}, query_len {n}): {m}")
        start += n
    assert torch.equal(got_cache, ref_cache.to(dtype)), "cache differs from the torch backend's"
    return triton_be, md


# A mixed step of every kind, in an order that interleaves them (decodes are not a prefix).
def mixed_seqs(block_size: int) -> list[tuple[int, int]]:
    return [
        (0, 7),  # fresh prefill
        (13, 1),  # decode
        (block_size - 1, 1),  # decode that fills its block
        (2 * block_size, 5),  # chunk after a block-aligned context (a prefix-cache hit)
        (11, 2 * block_size + 3),  # prompt chunk over cached context, several query tiles
        (block_size, 1),  # decode that opens a block
        (0, 1),  # one-token prompt
        (3 * block_size + 2, 3),  # a few tokens at once (speculative verification)
    ]


# The two decode kernels: the group-tile one, and the per-query-head one-warp programs that
# small batches of short contexts use (``decode_per_head_max_batch``, ``_max_len``).
DECODE_KERNELS = {"group": dict(decode_per_head_max_batch=0),
                  "per-head": dict(decode_per_head_max_batch=10_000,
                                   decode_per_head_max_len=10**9)}
decode_kernels = pytest.mark.parametrize("kernel", list(DECODE_KERNELS))


def split_tune(kernel: str, min_partition: int = 32) -> dict:
    """Tuning that splits every decode as far as ``min_partition`` allows, with ``kernel``."""
    return dict(DECODE_KERNELS[kernel], decode_min_partition=min_partition,
                decode_head_min_partition=min_partition,
                decode_programs_per_sm=10_000, decode_head_programs_per_sm=10_000)


# ---- interpreted (or native) checks on tiny shapes ---------------------------------------

@needs_kernels
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("head_dim", [16, 32])
def test_mixed_batch_matches_torch(head_dim, group, block_size):
    check_against_torch(mixed_seqs(block_size), 2 * group, 2, head_dim, block_size,
                        torch.float32, seed=head_dim * 100 + group * 10 + block_size)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_matches_torch(dtype):
    check_against_torch(mixed_seqs(4), 4, 2, 32, 4, dtype, seed=7)


@needs_kernels
def test_tile_boundaries_and_big_groups():
    # Queries spanning several query tiles and key tiles; a group of 8 (MQA-like).
    seqs = [(70, 40), (0, 65), (5, 1), (129, 1)]
    check_against_torch(seqs, 8, 1, 16, 16, torch.float32, seed=11)


@needs_kernels
@decode_kernels
@pytest.mark.parametrize("decodes_first", [True, False], ids=["dense", "interleaved"])
def test_split_decode_matches_torch(decodes_first, kernel):
    # Force flash-decoding splits on short contexts: 32-token partitions, as many as fit.
    # Lengths differ a lot, so short sequences leave later partitions empty.
    seqs = [(150, 1), (3, 1), (64, 1), (97, 1)]
    if decodes_first:
        seqs.append((20, 6))
    else:
        seqs.insert(1, (20, 6))
    be, md = check_against_torch(
        seqs, 4, 2, 16, 4, torch.float32, seed=3,
        tune=split_tune(kernel))
    assert be._per_head(4, 151) == (kernel == "per-head")
    assert be._splits(4, 151, DEVICE) == 5  # 150 tokens: 5 partitions of 32 keys
    plan = next(iter(md.__dict__["_triton_attention_plans"].values()))
    assert (plan.decode_ids is None) == decodes_first  # dense decodes need no index map


@needs_kernels
def test_negative_slots_are_not_written():
    # A padded batch (as CUDA graphs use) marks its padding tokens with slot -1.
    q, k, v, cache, md = make_step([(5, 3)], 2, 2, 16, 4, torch.float32, DEVICE, seed=5)
    md.slot_mapping = torch.cat([md.slot_mapping, md.slot_mapping.new_tensor([-1])])
    pad = lambda t: torch.cat([t, t[:1] * 100])  # noqa: E731
    expected = cache.clone()
    expected.view(2, -1, 2, 16)[0, md.slot_mapping[:3]] = k
    expected.view(2, -1, 2, 16)[1, md.slot_mapping[:3]] = v
    TritonAttentionBackend(2, 2, 16, 0.25).forward(pad(q), pad(k), pad(v), cache, md)
    assert torch.equal(cache, expected)


@needs_kernels
@decode_kernels
@pytest.mark.parametrize("split", [False, True], ids=["one-partition", "split"])
def test_decode_only_step_writes_kv_inside_the_decode_kernel(split, kernel):
    # Every row one new token, in batch order: the decode kernel writes the K/V (no write
    # kernel runs), including a token that opens a block, one that fills one, and one with
    # no context at all; outputs and cache equal the torch backend's.
    seqs = [(150, 1), (0, 1), (15, 1), (16, 1), (47, 1)]
    tune = split_tune(kernel) if split else dict(DECODE_KERNELS[kernel], decode_max_splits=1)
    be, md = check_against_torch(seqs, 4, 2, 16, 16, torch.float32, seed=9, tune=tune)
    assert (be._splits(len(seqs), 151, DEVICE) > 1) == bool(split)
    plan = next(iter(md.__dict__["_triton_attention_plans"].values()))
    assert plan.num_tiles == 0 and plan.decode_ids is None  # the fused-write path


def check_fused_rotary(seqs, num_heads, num_kv_heads, head_dim, block_size, dtype, seed,
                       qk_norm: bool, tune=None, device=DEVICE, repeats=2,
                       by_position: bool = False):
    """A decode-only step given unrotated q/k and ``rotary=``: the output and cache equal
    rotating first (the model's own rotary op, torch path) and then the torch backend.
    The same backend runs the step ``repeats`` times on fresh caches, so a combine counter
    left dirty by one step would show in the next."""
    from pagedllm.attention import RotaryInputs
    from pagedllm.plugins.models import fused_ops
    from pagedllm.plugins.models.rope import RotaryEmbedding

    q, k, v, cache, md = make_step(seqs, num_heads, num_kv_heads, head_dim, block_size,
                                   dtype, device, seed)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    positions = md.seq_lens.long() - 1
    # The fused path gathers from a table of max_positions rows: it must cover the step.
    rope = RotaryEmbedding(head_dim, {"rope_theta": 10000.0, "rope_type": "default"},
                           max_positions=int(positions.max()) + 1)
    norm = None
    if qk_norm:
        w = lambda: (1 + 0.3 * torch.randn(head_dim, generator=gen, device=device)).to(dtype)  # noqa: E731
        norm = (w(), w(), 1e-6)
    scale = head_dim**-0.5
    ref_q, ref_k = fused_ops.rotary(q.cpu(), k.cpu(), tuple(
        t.cpu() for t in rope.cos_sin(positions, dtype)),
        qk_norm=None if norm is None else tuple(
            t.cpu() if torch.is_tensor(t) else t for t in norm))
    ref_cache = cache.cpu().clone()
    want = TorchAttentionBackend(num_heads, num_kv_heads, head_dim, scale).forward(
        ref_q, ref_k, v.cpu(), ref_cache, AttentionMetadata(
            slot_mapping=md.slot_mapping.cpu(), query_start_loc=md.query_start_loc.cpu(),
            seq_lens=md.seq_lens.cpu(), block_tables=md.block_tables.cpu(),
            max_query_len=1, max_seq_len=md.max_seq_len,
            query_lens_host=md.query_lens_host, seq_lens_host=md.seq_lens_host))
    be = TritonAttentionBackend(num_heads, num_kv_heads, head_dim, scale)
    for name, value in (tune or {}).items():
        setattr(be, name, value)
    assert be.fuses_rotary(md)
    if by_position:  # whole tables: the kernel finds each token's row from seq_lens
        assert be.rotary_by_position
        cos, sin = rope.tables(positions.device, dtype)
        assert cos.shape == (int(positions.max()) + 1, head_dim)
    else:
        cos, sin = rope.cos_sin(positions, dtype, as_float32=True)
        cos, sin = cos.reshape(len(seqs), -1), sin.reshape(len(seqs), -1)
    fused = RotaryInputs(cos, sin, *(norm or (None, None, 0.0)), by_position=by_position)
    for _ in range(repeats):
        got_cache = cache.clone()
        got = be.forward(q.clone(), k.clone(), v, got_cache, md, rotary=fused)
        tol = TOLERANCE[dtype]
        torch.testing.assert_close(got.cpu().float(), want.float(), **tol)
        # Rotated keys: one rounding of the same float32 math (the norm's sum in another
        # order), so equal in fp32 and within an ulp in bf16.
        torch.testing.assert_close(got_cache.cpu().float(), ref_cache.float(),
                                   **(dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32
                                      else dict(atol=2e-2, rtol=1e-2)))
    return be


@needs_kernels
@decode_kernels
@pytest.mark.parametrize("qk_norm", [False, True], ids=["rope", "rope+qk-norm"])
@pytest.mark.parametrize("split", [False, True, "16-key tiles"],
                         ids=["one-partition", "split", "split-16-keys"])
@pytest.mark.parametrize("by_position", [False, True], ids=["rows", "tables"])
def test_decode_only_step_applies_rotary_inside_the_decode_kernel(split, qk_norm, kernel,
                                                                  by_position):
    seqs = [(150, 1), (0, 1), (15, 1), (16, 1), (47, 1)]
    tune = split_tune(kernel) if split else dict(DECODE_KERNELS[kernel], decode_max_splits=1)
    if split == "16-key tiles":  # partitions of 16 keys: the new token alone in some
        tune.update(decode_block_n=16, decode_head_block_n=16, decode_min_partition=16,
                    decode_head_min_partition=16)
    elif kernel == "per-head":  # tiles of 8 keys: partitions of several tiles
        tune.update(decode_head_block_n=8)
    be = check_fused_rotary(seqs, 4, 2, 16, 16, torch.float32, seed=12 + qk_norm,
                            qk_norm=qk_norm, tune=tune, by_position=by_position)
    assert (be._splits(len(seqs), 151, DEVICE) > 1) == bool(split)


def check_partials(seqs, heads, kv_heads, dim, block_size, tune, n_out, device, seed):
    """forward_partials does forward's work (the same K/V written) but leaves each head's
    attention in partitions; combined they are forward's output, and combine_linear (o_proj
    over them) equals combining first and multiplying, into a float32 sum that it adds
    to, zeroing the buffer it is given on the way.  Returns the partials."""
    from pagedllm.plugins.models import fused_ops

    dtype, rows = torch.bfloat16, len(seqs)
    q, k, v, cache, md = make_step(seqs, heads, kv_heads, dim, block_size, dtype, device, seed)
    be = TritonAttentionBackend(heads, kv_heads, dim, dim**-0.5)
    for name, value in tune.items():
        setattr(be, name, value)
    want_cache = cache.clone()
    want = be.forward(q, k, v, want_cache, md)
    got_cache = cache.clone()
    parts = be.forward_partials(q, k, v, got_cache, md)
    assert parts is not None and parts.out.shape == (rows, heads, parts.num_splits, dim)
    assert torch.equal(got_cache, want_cache)
    combined = parts.combine()
    assert combined.dtype == dtype
    torch.testing.assert_close(combined.float(), want.reshape(rows, -1).float(),
                               atol=1e-2, rtol=1e-2)  # the same sums in another order
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    w = (torch.randn(n_out, heads * dim, generator=gen, device=device) / dim**0.5).to(dtype)
    sums = torch.zeros(rows + 1, n_out, dtype=torch.float32, device=device)
    zero = torch.full((2, n_out), 7.0, device=device)
    got = fused_ops.combine_linear(parts, w, sums[:rows], zero.view(-1))
    # The kernel rounds each head's output to bf16 as combine() does; the interpreter's
    # bf16 rounding truncates, though, so there the outputs may differ by an ulp, which
    # an identity weight shows as such and a random one as a few hundredths.
    torch.testing.assert_close(got, combined.float() @ w.float().T,
                               **(dict(atol=0.05, rtol=0.02) if INTERPRET
                                  else dict(atol=1e-3, rtol=1e-3)))
    assert got.data_ptr() == sums.data_ptr() and not sums[rows].any() and not zero.any()
    eye = torch.eye(heads * dim, device=device).to(dtype)
    picked = fused_ops.combine_linear(parts, eye, torch.zeros(rows, heads * dim, device=device),
                                      zero.view(-1))
    torch.testing.assert_close(picked, combined.float(), atol=1e-6, rtol=2**-7)
    return parts


@needs_kernels
@pytest.mark.parametrize("split", [False, True], ids=["one-partition", "split"])
def test_attention_partials_combine_to_the_output_and_feed_o_proj(split):
    tune = (split_tune("per-head", 8) if split
            else dict(DECODE_KERNELS["per-head"], decode_head_min_partition=10**6))
    parts = check_partials([(13, 1), (0, 1), (40, 1)], 4, 2, 32, 4, tune, 24, DEVICE, 11)
    assert (parts.num_splits > 1) == split


@needs_kernels
def test_attention_partials_are_declined_where_the_per_head_kernel_is_not():
    seqs = [(13, 1), (40, 1)]
    for dtype, tune, step in ((torch.float32, DECODE_KERNELS["per-head"], seqs),
                              (torch.bfloat16, DECODE_KERNELS["group"], seqs),
                              (torch.bfloat16, DECODE_KERNELS["per-head"], [(13, 2), (4, 1)])):
        q, k, v, cache, md = make_step(step, 4, 2, 32, 4, dtype, DEVICE, seed=3)
        be = TritonAttentionBackend(4, 2, 32, 32**-0.5)
        for name, value in tune.items():
            setattr(be, name, value)
        before = cache.clone()
        assert be.forward_partials(q, k, v, cache, md) is None
        assert torch.equal(cache, before)  # nothing ran


@needs_kernels
def test_fused_rotary_is_declined_for_mixed_steps():
    _, _, _, _, md = make_step(mixed_seqs(4), 4, 2, 16, 4, torch.float32, DEVICE, seed=1)
    assert not TritonAttentionBackend(4, 2, 16, 0.25).fuses_rotary(md)
    assert not TorchAttentionBackend(4, 2, 16, 0.25).fuses_rotary(md)


@needs_kernels
@decode_kernels
def test_decode_only_graph_padding_writes_nothing(kernel):
    # Padded rows of a graph batch: one token at position 0 of a 1-token context, slot -1,
    # block table row 0.  Only the real rows' K/V may land in the cache.
    q, k, v, cache, md = make_step([(20, 1), (3, 1)], 4, 2, 16, 4, torch.float32, DEVICE,
                                   seed=6)
    pad_rows = 2
    md = AttentionMetadata(
        slot_mapping=torch.cat([md.slot_mapping, md.slot_mapping.new_full((pad_rows,), -1)]),
        query_start_loc=torch.arange(5, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.cat([md.seq_lens, md.seq_lens.new_ones(pad_rows)]),
        block_tables=torch.cat([md.block_tables, md.block_tables.new_zeros(
            (pad_rows, md.block_tables.shape[1]))]),
        max_query_len=1, max_seq_len=64, query_lens_host=[1] * 4,
        seq_lens_host=[64] * 4)  # as a graph batch declares them: the longest possible
    pad = lambda t: torch.cat([t, t[:1].expand(pad_rows, *t.shape[1:]) * 100])  # noqa: E731
    expected = cache.clone()
    expected.view(2, -1, 2, 16)[0, md.slot_mapping[:2]] = k
    expected.view(2, -1, 2, 16)[1, md.slot_mapping[:2]] = v
    be = TritonAttentionBackend(4, 2, 16, 0.25)
    for name, value in split_tune(kernel, 16).items():  # split, as graphs do
        setattr(be, name, value)
    got = be.forward(pad(q), pad(k), pad(v), cache, md)
    assert torch.equal(cache, expected)
    # The real rows' outputs equal the torch backend's on the unpadded step.
    ref_cache = expected.clone()
    ref_md = AttentionMetadata(
        slot_mapping=md.slot_mapping[:2], query_start_loc=md.query_start_loc[:3],
        seq_lens=md.seq_lens[:2], block_tables=md.block_tables[:2], max_query_len=1,
        max_seq_len=21, query_lens_host=[1, 1], seq_lens_host=[21, 4])
    want = TorchAttentionBackend(4, 2, 16, 0.25).forward(q, k, v, ref_cache, ref_md)
    torch.testing.assert_close(got[:2], want, **TOLERANCE[torch.float32])


@needs_kernels
def test_auto_picks_triton():
    from pagedllm.plugin_manager import select

    entry = select("attention", "auto", head_dim=16, dtype=torch.float32, device=DEVICE)
    assert entry.name == "triton"


@needs_kernels
def test_whole_model_greedy_tokens_match_torch(tmp_path):
    from pagedllm import LLM, SamplingParams

    from tiny_models import build_tiny_model, random_prompts

    build_tiny_model("llama", tmp_path)
    shared = random_prompts([9], seed=1)[0]
    prompts = [{"prompt_token_ids": p} for p in random_prompts([23, 5, 2], seed=2)]
    # Two prompts sharing a 9-token prefix: the second hits the prefix cache.
    prompts += [{"prompt_token_ids": shared + [7, 8]}, {"prompt_token_ids": shared + [9]}]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    results = {}
    for backend in ("torch", "triton"):
        # Small token budget: prompts go in chunks, next to other requests' decodes.
        llm = LLM(model=str(tmp_path), device=str(DEVICE), dtype="float32",
                  attention_backend=backend, block_size=4, num_kv_blocks=64,
                  enable_chunked_prefill=True, max_num_batched_tokens=10)
        assert llm.engine.attention_cls.name == backend
        outs = llm.generate(prompts, params, use_tqdm=False)
        results[backend] = [o.outputs[0].token_ids for o in outs]
    assert results["triton"] == results["torch"]


@needs_kernels
def test_whole_model_o_proj_over_partials_keeps_the_tokens(tmp_path, monkeypatch):
    # The model's whole path with o_proj over the attention's partitions (forced on here,
    # and for float32, so tokens compare exactly): the decode steps' attention kernels store
    # partitions, combine_linear adds o_proj into float32 sums, the next norm reads them.
    from pagedllm import LLM, SamplingParams
    from pagedllm.plugins.models import decoder, fused_ops

    from tiny_models import build_tiny_model, random_prompts

    build_tiny_model("qwen3", tmp_path)
    prompts = [{"prompt_token_ids": p} for p in random_prompts([6, 11, 3], seed=4)]
    params = SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)
    results = {}
    for fused in (False, True):
        if fused:
            monkeypatch.setattr(fused_ops, "O_PROJ_DTYPES", (torch.float32,))
            monkeypatch.setattr(TritonAttentionBackend, "partials_dtypes", (torch.float32,))
            monkeypatch.setattr(decoder, "combine_linear_applies",
                                lambda rows, w: fused_ops.combine_linear_applies(rows, w, True))
        calls = []
        monkeypatch.setattr(decoder, "combine_linear",
                            lambda *a: calls.append(1) or fused_ops.combine_linear(*a))
        llm = LLM(model=str(tmp_path), device=str(DEVICE), dtype="float32",
                  attention_backend="triton", block_size=4, num_kv_blocks=64)
        results[fused] = [o.outputs[0].token_ids
                          for o in llm.generate(prompts, params, use_tqdm=False)]
        assert (llm.engine.model.o_proj_sum_buffers is not None) == fused
        # Every layer of every decode step (6 after each prompt's first token; the three
        # decode together, and the tiny model has 2 layers) took it.
        layers = len(llm.engine.model.model.layers)
        assert len(calls) == (6 * layers if fused else 0)
    assert results[True] == results[False]


@needs_kernels
def test_whole_model_split_down_proj_keeps_the_tokens(tmp_path, monkeypatch):
    # The model's whole path with down_proj split over its columns (forced on here, and for
    # float32, so tokens compare exactly), beside o_proj over partitions: each layer's
    # down_proj adds into a float32 sum that the next layer's norm (the last one's: the
    # final norm) reads, and zeroes the layer before's.  One row a step (max_num_seqs 1),
    # as it runs by default; with three rows a step it must stay off.
    from pagedllm import LLM, SamplingParams
    from pagedllm.plugins.models import decoder, fused_ops

    from tiny_models import build_tiny_model, random_prompts

    build_tiny_model("qwen3", tmp_path)
    prompts = [{"prompt_token_ids": p} for p in random_prompts([6, 11, 3], seed=5)]
    params = SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)
    monkeypatch.setattr(fused_ops, "O_PROJ_DTYPES", (torch.float32,))
    monkeypatch.setattr(TritonAttentionBackend, "partials_dtypes", (torch.float32,))
    monkeypatch.setattr(decoder, "combine_linear_applies",
                        lambda rows, w: fused_ops.combine_linear_applies(rows, w, True))
    results = {}
    for split, seqs in ((False, 1), (True, 1), (True, 3)):
        if split:
            monkeypatch.setattr(
                decoder, "silu_mul_linear_sum_applies",
                lambda rows, w: rows == 1 and fused_ops.silu_mul_linear_sum_applies(rows, w, True))
        calls = []
        monkeypatch.setattr(decoder, "silu_mul_linear_sum",
                            lambda *a: calls.append(1) or fused_ops.silu_mul_linear_sum(*a))
        llm = LLM(model=str(tmp_path), device=str(DEVICE), dtype="float32",
                  attention_backend="triton", block_size=4, num_kv_blocks=64,
                  max_num_seqs=seqs)
        results[split, seqs] = [o.outputs[0].token_ids
                                for o in llm.generate(prompts, params, use_tqdm=False)]
        model = llm.engine.model
        assert (model.down_sum_buffers is not None) == (split and seqs == 1)
        layers = len(model.model.layers)
        # One row a step: every layer of the 18 decode steps (6 a prompt; the prefills have
        # more rows); three rows a step: none (every prompt decodes beside the others).
        if split and seqs == 1:
            assert len(calls) == 18 * layers
            # Zero again after every step but the last layer's, which the next step zeroes.
            sums = model.down_sum_buffers
            assert not sums[:-1].any() and sums[-1, 0].any() and not sums[-1, 1:].any()
        else:
            assert not calls
    assert results[True, 1] == results[False, 1] == results[True, 3]


# ---- always ------------------------------------------------------------------------------

def test_supports_rejects_what_the_kernels_cannot_do():
    cpu = torch.device("cpu")
    for head_dim in (8, 24, 48, 512):
        assert not TritonAttentionBackend.supports(head_dim, torch.float32, cpu)
    assert not TritonAttentionBackend.supports(64, torch.float64, cpu)
    if not INTERPRET:
        assert not TritonAttentionBackend.supports(64, torch.float32, cpu)
    with pytest.raises(ValueError, match="head_dim"):
        TritonAttentionBackend(4, 2, 24, 1.0)


def test_registry_loads_without_triton():
    # Hide triton from imports: the plugin still registers, and supports() says no.
    script = (
        "import sys\n"
        "sys.modules['triton'] = None  # import triton now fails, as if it were missing\n"
        "import torch\n"
        "from pagedllm.plugin_manager import get_registry\n"
        "cls = get_registry().get('attention', 'triton').cls\n"
        "assert not cls.supports(64, torch.float16, torch.device('cuda'))\n"
        "assert not cls.supports(64, torch.float32, torch.device('cpu'))\n"
        "print('ok')\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stdout + out.stderr


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
@pytest.mark.skipif(INTERPRET, reason="already interpreting: the checks run in this process")
@pytest.mark.skipif(CUDA, reason="the checks run natively on this machine's GPU")
def test_interpreted_checks_pass():
    """CI's path: this module's checks and the conformance test, under the interpreter.

    The conformance grid's head_dim 64 and 128 cases run the same code paths as 16 and 32,
    only slower when interpreted (the whole grid: about 3 minutes on 2 busy cores); they run
    natively wherever there is a GPU.
    """
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu",
           # The conformance grid's triton cases; every test here, in test_fused_ops and
           # in test_step_inputs.
           "-k", "(triton or fused_ops or step_inputs) and not triton-64- and not triton-128-",
           str(TESTS / "test_triton_backend.py"), str(TESTS / "test_attention_conformance.py"),
           str(TESTS / "test_fused_ops.py"), str(TESTS / "test_step_inputs.py")]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=TESTS.parent,
                         timeout=900)
    tail = (out.stdout + out.stderr)[-6000:]
    assert out.returncode == 0, tail
    assert " passed" in out.stdout and "failed" not in out.stdout, tail


# ---- GPU: real shapes --------------------------------------------------------------------

GPU_SHAPES = [  # (num_heads, num_kv_heads): GQA groups 1, 2, 3, 4, 8
    (8, 8), (16, 8), (12, 4), (32, 8), (64, 8),
]


def long_seqs(block_size: int) -> list[tuple[int, int]]:
    return [
        (32767, 1),  # decode at 32k
        (0, 777),  # fresh prefill
        (4096, 1),
        (8192, 300),  # prompt chunk over a long context
        (block_size * 128, 64),  # prefix-cache hit, block aligned
        (1, 1), (block_size - 1, 1), (1000, 1),
        (20000, 4),  # speculative-style verification over a long context
        (15, 1),
    ]


GPU_CASES = (
    # bf16 (the serving dtype): every shape, both block sizes.
    [(d, h, bs, torch.bfloat16) for d in (64, 128) for h in GPU_SHAPES for bs in (16, 32)]
    # fp16 and fp32: fewer shapes (fp32 runs the dots at IEEE precision, other tile sizes).
    + [(d, h, 16, dt) for dt in (torch.float16, torch.float32) for d in (64, 128)
       for h in ((32, 8), (12, 4))]
)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "head_dim, heads, block_size, dtype", GPU_CASES,
    ids=[f"d{d}-{h[0]}q{h[1]}kv-bs{bs}-{str(dt)[6:]}" for d, h, bs, dt in GPU_CASES])
def test_gpu_long_contexts_match_torch(head_dim, heads, block_size, dtype):
    if not HAVE_TRITON:
        pytest.skip("triton is not installed")
    num_heads, num_kv_heads = heads
    seed = head_dim + num_heads + block_size
    check_against_torch(long_seqs(block_size), num_heads, num_kv_heads, head_dim, block_size,
                        dtype, seed=seed, device=torch.device("cuda"), reference_fp32=True)


@pytest.mark.gpu
@decode_kernels
@pytest.mark.parametrize("batch", [1, 3, 64])
def test_gpu_split_decode_matches_torch(batch, kernel):
    """Decode-only batches (the W6 shape): small batches split each sequence many ways."""
    if not HAVE_TRITON:
        pytest.skip("triton is not installed")
    rng = random.Random(batch)
    seqs = [(rng.choice([1023, 4095, 16383, 32767]) if batch < 64 else rng.randint(1, 8191), 1)
            for _ in range(batch)]
    be, _ = check_against_torch(seqs, 32, 8, 128, 16, torch.bfloat16, seed=batch,
                                device=torch.device("cuda"), reference_fp32=True,
                                tune=DECODE_KERNELS[kernel])
    if batch == 1:
        assert be._splits(1, seqs[0][0] + 1, torch.device("cuda")) > 1


@pytest.mark.gpu
@decode_kernels
@pytest.mark.parametrize("batch", [1, 5, 64])
@pytest.mark.parametrize("qk_norm", [False, True], ids=["rope", "rope+qk-norm"])
@pytest.mark.parametrize("by_position", [False, True], ids=["rows", "tables"])
def test_gpu_fused_rotary_decode_matches_torch(batch, qk_norm, kernel, by_position):
    # Real shapes (Qwen3-0.6B's 16/8 heads of 128), lengths from 1 to 4k, the split
    # counts the backend picks (66 at batch 1 on an H200), and several steps on one
    # backend: the combine counters must come back to zero every time.
    rng = random.Random(batch)
    seqs = [(rng.choice([0, 1, 63, 64, 200, rng.randrange(4096)]), 1) for _ in range(batch)]
    check_fused_rotary(seqs, 16, 8, 128, 16, torch.bfloat16, seed=batch, qk_norm=qk_norm,
                       device=torch.device("cuda"), repeats=4, tune=DECODE_KERNELS[kernel],
                       by_position=by_position)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 3])
def test_gpu_attention_partials_feed_o_proj_at_real_shapes(batch):
    # Qwen3-0.6B's attention (16/8 heads of 128) and o_proj (1024 x 2048), W2's contexts,
    # the backend's own split counts.
    rng = random.Random(batch)
    seqs = [(rng.choice([0, 127, 128, 300, 383]), 1) for _ in range(batch)]
    parts = check_partials(seqs, 16, 8, 128, 16, {}, 1024, torch.device("cuda"), batch)
    assert parts.num_splits > 1


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [256, 32])
def test_gpu_other_head_dims(head_dim):
    if not HAVE_TRITON:
        pytest.skip("triton is not installed")
    for dtype in (torch.bfloat16, torch.float32):
        check_against_torch(long_seqs(16)[:6], 16, 4, head_dim, 16, dtype, seed=head_dim,
                            device=torch.device("cuda"), reference_fp32=True)


def test_per_head_kernel_is_for_small_batches_of_short_contexts():
    # The rule and the graph buckets that go with it: a short-context graph is worth
    # capturing exactly for the batch sizes that may take the per-head kernel, and at its
    # length that kernel applies (its partitions then one tile each).
    be = TritonAttentionBackend(16, 8, 128, 0.1)
    cls = TritonAttentionBackend
    small, short = cls.decode_per_head_max_batch, cls.decode_per_head_max_len
    assert be._per_head(small, short) and be._per_head(1, 1)
    assert not be._per_head(small + 1, short) and not be._per_head(1, short + 1)
    assert cls.cuda_graph_context_buckets(small) == (short,)
    assert cls.cuda_graph_context_buckets(small + 1) == ()
    splits = be._splits(1, short, torch.device("cpu"))
    assert -(-short // splits) <= be.decode_head_block_n
