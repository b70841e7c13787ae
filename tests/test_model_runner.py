"""The packed step the model runner hands the device: every field of a decode batch padded to
a CUDA-graph size, and of an eager mixed batch, checked against the requests and their block
tables.  The staging buffers are filled with a sentinel first, so a field the runner forgot
to write shows up (it reuses them step after step without clearing them)."""
from __future__ import annotations

import random

import pytest
import torch

from pagedllm import LLM, SamplingParams


SENTINEL = 7777


class FakeGraphs:
    """Stands in for ``DecodeGraphs`` on CPU: every decode batch pads to ``pad_to`` rows, and
    replays a graph captured for contexts up to ``short`` tokens where it fits."""

    def __init__(self, pad_to: int, table_width: int, short: int = 32, model_len: int = 4096):
        self.pad_to = pad_to
        self.table_width = table_width
        self.short, self.model_len = short, model_len

    def context_for(self, b: int, longest: int) -> int:
        return self.short if longest <= self.short else self.model_len

    def batch_for(self, num_seqs: int) -> int:
        return self.pad_to if num_seqs <= self.pad_to else 0

    def buffer(self, size: int) -> torch.Tensor:
        return torch.full((size,), SENTINEL, dtype=torch.int32)


@pytest.fixture(scope="module")
def model_dir(tiny_llama_dir):
    return tiny_llama_dir


def _engine(model_dir, **kw):
    llm = LLM(model=model_dir, device="cpu", block_size=4, num_kv_blocks=200,
              async_scheduling=False, **kw)
    engine = llm.engine
    for buf in engine.runner._staging:
        buf.fill_(SENTINEL)
    return engine


def _add(engine, lengths, seed, max_tokens=30):
    rnd = random.Random(seed)
    for i, n in enumerate(lengths):
        engine.add_request(f"r{seed}-{i}", {"prompt_token_ids": [rnd.randrange(3, 300)
                                                                 for _ in range(n)]},
                           SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))


def _check_rows(engine, sched, mi, tables, width_read):
    """Rows of the real sequences: tokens, positions, slots, lengths and tables."""
    kv, bs = engine.kv_manager, engine.kv_manager.block_size
    row = 0
    for i, item in enumerate(sched.scheduled):
        req, n = item.request, item.num_new_tokens
        start = req.num_computed_tokens
        table = kv.block_tables[req.request_id]
        for j in range(n):
            p = start + j
            assert mi.input_ids[row + j] == req.all_token_ids[p]
            assert mi.positions[row + j] == p
            assert mi.metadata.slot_mapping[row + j] == table[p // bs] * bs + p % bs
        assert mi.metadata.seq_lens[i] == start + n
        assert tables[i, : len(table)].tolist() == table
        assert not tables[i, len(table) : width_read].any()  # zeros up to the widest table
        row += n
    return row


def test_decode_batch_padded_to_a_graph_size(model_dir):
    engine = _engine(model_dir)
    _add(engine, [3, 9, 17, 30, 5], seed=1)
    engine.step()  # the prompts, in one eager step
    width = 40
    engine.runner.graphs = FakeGraphs(pad_to=8, table_width=width)
    seen = set()
    for _ in range(6):  # decode steps; some cross a block boundary and take a new block
        sched = engine.scheduler.schedule()
        mi = engine.runner.prepare(sched)
        assert mi.graph_batch == 8 and mi.num_tokens == 5
        md = mi.metadata
        tables = md.block_tables
        assert tables.shape == (8, width)
        widest = max(len(engine.kv_manager.block_tables[s.request.request_id])
                     for s in sched.scheduled)
        assert _check_rows(engine, sched, mi, tables, widest) == 5
        # Padded rows: token 0 at position 0 of a 1-token context, written nowhere, reading
        # block 0 (a real block: the kernel reads its first key).
        assert mi.input_ids[5:].tolist() == [0] * 3 and mi.positions[5:].tolist() == [0] * 3
        assert md.slot_mapping[5:].tolist() == [-1] * 3
        assert md.seq_lens[5:].tolist() == [1] * 3 and tables[5:, 0].tolist() == [0] * 3
        assert md.query_start_loc.tolist() == list(range(9))
        assert mi.sample_rows.tolist() == list(range(5))
        assert md.query_lens_host == [1] * 8
        # The graph's declared context: the short one while every sequence fits it (the
        # 30-token prompt outgrows 32 tokens on the way), else the model's.
        longest = max(s.request.num_computed_tokens + 1 for s in sched.scheduled)
        context = 32 if longest <= 32 else 4096
        assert mi.graph_context == md.max_seq_len == context
        assert md.seq_lens_host == [context] * 8
        seen.add(context)
        # Run the step for real (eagerly: the fake has no graphs) to move on; it schedules
        # the same batch again, nothing having changed.
        engine.runner.graphs = None
        engine.step()
        engine.runner.graphs = FakeGraphs(pad_to=8, table_width=width)
    assert seen == {32, 4096}


def test_graph_context_lengths_come_from_the_backend():
    # Each batch size is captured at the model's length and at the shorter lengths the
    # attention backend names for it; a batch replays the shortest its longest sequence
    # fits.  (Building DecodeGraphs captures nothing: it runs on CPU.)
    from pagedllm.cuda_graphs import DecodeGraphs

    graphs = DecodeGraphs(None, [], torch.device("cpu"), 16, 4096, 16,
                          context_buckets=lambda b: (512, 8192, 0) if b <= 2 else ())
    assert graphs.lengths[1] == graphs.lengths[2] == [512, 4096]  # only lengths below 4096
    assert graphs.lengths[4] == graphs.lengths[16] == [4096]
    assert graphs.context_for(1, 1) == graphs.context_for(2, 512) == 512
    assert graphs.context_for(1, 513) == graphs.context_for(4, 3) == 4096


def test_mixed_prompt_and_decode_step(model_dir):
    engine = _engine(model_dir, scheduler="chunked_prefill", max_num_batched_tokens=24)
    _add(engine, [6, 11], seed=2)
    engine.step()
    engine.step()  # both decoding now (the budget took both prompts in one step)
    _add(engine, [40, 7], seed=3)  # a long prompt, chunked, beside the decodes
    for _ in range(4):
        sched = engine.scheduler.schedule()
        lens = [s.num_new_tokens for s in sched.scheduled]
        assert any(n > 1 for n in lens) or len(lens) > 2
        mi = engine.runner.prepare(sched)
        assert mi.graph_batch == 0 and mi.num_tokens == sum(lens)
        md = mi.metadata
        widest = max(len(engine.kv_manager.block_tables[s.request.request_id])
                     for s in sched.scheduled)
        assert md.block_tables.shape == (len(lens), widest)
        assert _check_rows(engine, sched, mi, md.block_tables, widest) == sum(lens)
        starts = [0]
        for n in lens:
            starts.append(starts[-1] + n)
        assert md.query_start_loc.tolist() == starts
        sampled = [starts[i + 1] - 1 for i, s in enumerate(sched.scheduled)
                   if s.request.num_computed_tokens + s.num_new_tokens == s.request.num_tokens]
        assert mi.sample_rows.tolist() == sampled
        engine.step()  # schedules the same batch again (nothing changed) and runs it


@pytest.mark.parametrize("dst,src", [([0], [0]), ([0, 1, 2], [3, 4, 5]), ([2, 3], [1, 0]),
                                     ([0, 2], [0, 1]), ([1, 0, 2], [0, 1, 2])])
def test_fill_placeholders_puts_each_token_in_its_row(dst, src):
    # Runs take one copy, the rest a gather and scatter: both give input_ids[dst[i]] =
    # prev_tokens[src[i]] and leave every other row alone.
    from pagedllm.model_runner import fill_placeholders

    gen = torch.Generator().manual_seed(len(dst) + sum(src))
    prev = torch.randint(0, 1000, (6,), generator=gen)  # int64, as the sampler gives them
    ids = torch.randint(0, 1000, (4,), generator=gen, dtype=torch.int32)
    want = ids.clone()
    for d, s in zip(dst, src):
        want[d] = int(prev[s])
    fill_placeholders(ids, prev, dst, src, torch.tensor(dst, dtype=torch.int32),
                      torch.tensor(src, dtype=torch.int32))
    assert ids.dtype == torch.int32 and torch.equal(ids, want)


class FeedingGraphs(FakeGraphs):
    """A ``FakeGraphs`` with one persistent step buffer, whose graphs "stored" their argmax
    over its ids: ``fed`` is the sampled-token tensor that counts as such."""

    def __init__(self, pad_to: int, table_width: int):
        super().__init__(pad_to, table_width)
        self.buf = torch.full((4096,), SENTINEL, dtype=torch.int32)
        self.fed: torch.Tensor | None = None

    def buffer(self, size: int) -> torch.Tensor:
        return self.buf[:size]

    def fed_ids(self, tokens) -> bool:
        return tokens is not None and self.fed is not None and (
            tokens.data_ptr() == self.fed.data_ptr())


@pytest.mark.parametrize("fed", [True, False])
def test_graph_fed_ids_are_neither_copied_nor_filled(model_dir, fed):
    # Async scheduling leaves every row's token on the device; where the last graph
    # stored its argmax over the ids (DecodeGraphs.fed_ids), the runner copies the step
    # from past the ids and fills nothing, so what the graph left there is what the next
    # one reads; otherwise the previous tokens are copied into place.
    engine = LLM(model=model_dir, device="cpu", block_size=4, num_kv_blocks=200,
                 async_scheduling=True).engine
    _add(engine, [3, 9, 17], seed=5)
    engine.step()  # the prompts: their tokens stay on the device, pending
    pending = engine._pending
    graphs = engine.runner.graphs = FeedingGraphs(pad_to=4, table_width=40)
    left = torch.tensor([901, 902, 903, 904], dtype=torch.int32)  # "the graph's argmax"
    graphs.buf[:4] = left
    if fed:
        graphs.fed = pending.batch.token_ids
    sched = engine.scheduler.schedule()
    mi = engine.runner.prepare(sched, pending.rows, pending.batch.token_ids)
    assert mi.graph_batch == 4
    want = left[:3] if fed else pending.batch.token_ids.to(torch.int32)
    assert torch.equal(mi.input_ids[:3], want)
    # Everything past the ids was copied as usual.
    positions = [s.request.num_computed_tokens for s in sched.scheduled]
    assert mi.positions[:3].tolist() == positions
    assert mi.metadata.seq_lens[:3].tolist() == [p + 1 for p in positions]


def test_one_layer_model_keeps_no_float32_sums(tmp_path, monkeypatch):
    # o_proj's and down_proj's float32 sums: layer i adds into sum i and zeroes sum i - 1,
    # which for one layer is the same sum; so a one-layer model never takes them, even
    # where they would apply (forced here), and keeps HF's tokens.
    from pagedllm import LLM, SamplingParams
    from pagedllm.plugins.models import decoder

    from tiny_models import hf_greedy, make_hf_model

    hf = make_hf_model("qwen3")
    hf.model.layers = hf.model.layers[:1]
    if getattr(hf.config, "layer_types", None):
        hf.config.layer_types = hf.config.layer_types[:1]
    hf.config.num_hidden_layers = 1
    hf.save_pretrained(str(tmp_path))
    monkeypatch.setattr(decoder, "silu_mul_linear_sum_applies", lambda rows, w: True)
    monkeypatch.setattr(decoder, "combine_linear_applies", lambda rows, w: True)
    llm = LLM(model=str(tmp_path), device="cpu", dtype="float32")
    prompt = [5, 9, 2, 7]
    out = llm.generate([{"prompt_token_ids": prompt}],
                       SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
                       use_tqdm=False)
    model = llm.engine.model
    assert model.down_sum_buffers is None and model.o_proj_sum_buffers is None
    assert out[0].outputs[0].token_ids == hf_greedy(hf, prompt, 5).tokens
