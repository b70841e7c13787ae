"""The chunked_prefill and priority scheduler plugins.

First driven without a model, as in test_scheduler.py (a scheduled request "computes" its
tokens; one that caught up appends a fake token), then end to end on a tiny random model,
where a policy may change when each request runs but never what it generates.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedllm import LLM, SamplingParams
from pagedllm.kv_cache import KVCacheManager
from pagedllm.plugin_manager import get_registry
from pagedllm.plugins.schedulers.chunked_prefill import ChunkedPrefillScheduler
from pagedllm.plugins.schedulers.fcfs import FCFSScheduler
from pagedllm.plugins.schedulers.priority import PriorityScheduler
from pagedllm.request import Request, RequestStatus
from pagedllm.scheduler import SchedulerConfig
from tiny_models import assert_well_separated, build_tiny_model, hf_greedy, random_prompts
from tiny_models import assert_all_blocks_free as _assert_all_blocks_free
from tiny_models import output_token_ids as _token_ids


# ---- model-free simulation ----------------------------------------------------------------
def make_request(name: str, prompt_len: int, max_tokens: int, arrival: int,
                 priority: int = 0) -> Request:
    req = Request(name, None, list(range(1, prompt_len + 1)),
                  SamplingParams(max_tokens=max_tokens), None, arrival_index=arrival,
                  priority=priority)
    req.max_tokens = max_tokens
    return req


def remaining(req: Request) -> int:
    return req.num_tokens - req.num_computed_tokens


def sim_step(sched):
    """One scheduler step, checking what every step must satisfy; returns
    ``({request id: new tokens}, preempted ids)``."""
    cfg = sched.config
    waiting_before = set(sched.waiting)
    decoding_before = [r for r in sched.running if remaining(r) == 1]
    out = sched.schedule()

    assert len(sched.running) <= cfg.max_num_seqs
    assert out.num_batched_tokens <= cfg.max_num_batched_tokens
    ids = [s.request.request_id for s in out.scheduled]
    assert len(ids) == len(set(ids))
    assert not set(out.preempted) & {s.request for s in out.scheduled}
    kv = sched.kv_cache
    for victim in out.preempted:
        assert victim.request_id not in kv.block_tables
        if victim.status == RequestStatus.SWAPPED:
            assert victim in sched.swapped and victim.request_id in kv.swapped_tables
        else:
            assert victim.num_computed_tokens == 0 and victim in sched.waiting

    # Admission order: nobody left waiting ranks strictly ahead of someone admitted.
    admitted = [s.request for s in out.scheduled if s.request in waiting_before]
    for a in admitted:
        for w in sched.waiting + sched.swapped:
            assert not sched.rank(w) < sched.rank(a), (
                f"{w.request_id} ({sched.rank(w)}) left waiting, "
                f"{a.request_id} ({sched.rank(a)}) admitted")

    if isinstance(sched, ChunkedPrefillScheduler):
        # Decodes are never starved by a prefill: if any prompt chunk ran, every request
        # that was decoding ran too (unless it was preempted).
        if any(s.request not in decoding_before for s in out.scheduled):
            scheduled = {s.request: s.num_new_tokens for s in out.scheduled}
            for d in decoding_before:
                assert d in out.preempted or scheduled.get(d) == 1, d.request_id

    for item in out.scheduled:
        req = item.request
        assert req.status == RequestStatus.RUNNING and item.num_new_tokens >= 1
        have = len(sched.kv_cache.block_tables[req.request_id]) * sched.kv_cache.block_size
        assert have >= req.num_computed_tokens + item.num_new_tokens
        req.num_computed_tokens += item.num_new_tokens
        kv.cache_full_blocks(req.request_id, req.all_token_ids, req.num_computed_tokens)
        if req.num_computed_tokens == req.num_tokens:
            req.output_token_ids.append(7)
            if len(req.output_token_ids) >= req.max_tokens:
                sched.finish(req, "length")
    kv.take_pending()  # block copies a device would do; nothing to move here
    return ({s.request.request_id: s.num_new_tokens for s in out.scheduled},
            [r.request_id for r in out.preempted])


class Chunked(ChunkedPrefillScheduler):
    @staticmethod
    def rank(req):  # first come, first served
        return req.arrival_index


class Priority(PriorityScheduler):
    @staticmethod
    def rank(req):  # only a strictly smaller priority value outranks
        return req.priority


def test_both_plugins_are_registered_and_chunked_prefill_declares_it_chunks():
    registry = get_registry()
    assert registry.get("scheduler", "chunked_prefill").cls is ChunkedPrefillScheduler
    assert registry.get("scheduler", "priority").cls is PriorityScheduler
    assert registry.get("scheduler", "chunked_prefill").plugin == "chunked_prefill_scheduler"
    assert registry.get("scheduler", "priority").plugin == "priority_scheduler"
    assert ChunkedPrefillScheduler.chunked_prefill is True
    assert not getattr(PriorityScheduler, "chunked_prefill", False)
    # Selected without the flag, it chunks anyway (and leaves the caller's config alone).
    config = SchedulerConfig(4, 64, 64)
    sched = ChunkedPrefillScheduler(config, KVCacheManager(100, 4))
    assert sched.config.enable_chunked_prefill and not config.enable_chunked_prefill


def test_long_prompt_is_split_while_running_requests_get_a_token_every_step():
    kv = KVCacheManager(num_blocks=100, block_size=4)
    sched = Chunked(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=8,
                                    max_model_len=64, enable_chunked_prefill=True), kv)
    a, b = make_request("a", 3, 10, 0), make_request("b", 2, 10, 1)
    sched.add_request(a)
    sched.add_request(b)
    steps = [sim_step(sched)[0]]
    c = make_request("c", 30, 2, 2)  # a long prompt arrives while a and b decode
    sched.add_request(c)
    steps += [sim_step(sched)[0] for _ in range(7)]
    assert steps == [
        {"a": 3, "b": 2},                  # both prompts fit: prefilled and sampled
        {"a": 1, "b": 1, "c": 6},          # c's 30 tokens: 6 a step, what the decodes leave
        {"a": 1, "b": 1, "c": 6},
        {"a": 1, "b": 1, "c": 6},
        {"a": 1, "b": 1, "c": 6},
        {"a": 1, "b": 1, "c": 6},          # c caught up: its first token
        {"a": 1, "b": 1, "c": 1},          # ... and its second, the last
        {"a": 1, "b": 1},
    ]
    assert len(a.output_token_ids) == len(b.output_token_ids) == 8  # one every step
    assert c.is_finished and len(c.output_token_ids) == 2


def test_a_recomputing_older_request_does_not_starve_decodes():
    """With fcfs order an old request (here: one recomputing after preemption) runs first
    and its chunks take the whole budget; chunked_prefill runs the decodes first."""
    def run(cls):
        kv = KVCacheManager(num_blocks=100, block_size=4)
        sched = cls(SchedulerConfig(8, 8, 64, enable_chunked_prefill=True), kv)
        new = make_request("new", 2, 20, arrival=5)
        sched.add_request(new)
        sim_step(sched)
        sched.add_request(make_request("old", 24, 2, arrival=0))
        return [sim_step(sched)[0] for _ in range(4)]

    class FCFS(FCFSScheduler):
        rank = staticmethod(lambda req: req.arrival_index)

    assert run(FCFS) == [{"new": 1, "old": 7},  # admitted behind the running decode ...
                         {"old": 8},            # ... then first in line: "new" gets nothing
                         {"old": 8},
                         {"new": 1, "old": 1}]
    assert run(Chunked) == [{"new": 1, "old": 7},
                            {"new": 1, "old": 7},
                            {"new": 1, "old": 7},
                            {"new": 1, "old": 3}]


def test_priority_admits_smallest_value_first_ties_by_arrival():
    kv = KVCacheManager(num_blocks=100, block_size=4)
    sched = Priority(SchedulerConfig(2, 64, 64), kv)
    for i, prio in enumerate([3, 1, 2, 1]):
        sched.add_request(make_request(f"r{i}", 4, 4, i, prio))
    assert list(sim_step(sched)[0]) == ["r1", "r3"]


def test_priority_preempts_the_least_urgent_running_request_not_the_newest():
    kv = KVCacheManager(num_blocks=6, block_size=4)  # 24 slots: two 8-token prompts + growth
    sched = Priority(SchedulerConfig(4, 64, 24), kv)
    old_low = make_request("old_low", 8, 12, 0, priority=5)
    new_high = make_request("new_high", 8, 12, 1, priority=0)
    sched.add_request(old_low)
    sched.add_request(new_high)
    preempted = []
    for _ in range(100):
        preempted += sim_step(sched)[1]
        if not sched.has_unfinished():
            break
    assert preempted and set(preempted) == {"old_low"}  # fcfs would preempt new_high
    assert new_high.metrics.num_preemptions == 0
    assert kv.num_free_blocks == 6


def test_urgent_arrival_preempts_less_urgent_running_requests_to_get_in():
    kv = KVCacheManager(num_blocks=8, block_size=4)  # 32 slots
    sched = Priority(SchedulerConfig(8, 64, 32), kv)
    lows = [make_request(f"low{i}", 6, 8, i, priority=2) for i in range(3)]
    for r in lows:
        sched.add_request(r)
    sim_step(sched)  # 3 x 6 tokens: 6 blocks, room to decode 2 more tokens each
    assert kv.num_free_blocks == 2
    # Equal priority waits its turn: it never preempts.
    peer = make_request("peer", 12, 2, 3, priority=2)
    sched.add_request(peer)
    steps, preempted = sim_step(sched)
    assert "peer" not in steps and not preempted
    # A more urgent request needing 3 blocks gets in now, at the least urgent one's cost.
    urgent = make_request("urgent", 12, 2, 4, priority=0)
    sched.add_request(urgent)
    steps, preempted = sim_step(sched)
    assert steps.get("urgent") == 12
    assert preempted == ["low2"]  # the newest of the least urgent; one was enough
    assert "low2" not in steps  # taken back out of this step's batch
    assert "peer" not in steps  # memory was short this step: no more admissions
    for _ in range(100):
        sim_step(sched)
        if not sched.has_unfinished():
            break
    assert all(r.is_finished for r in lows + [peer, urgent])
    assert kv.num_free_blocks == 8


def test_urgent_arrival_evicts_nobody_when_that_would_not_make_room():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    sched = Priority(SchedulerConfig(8, 64, 32), kv)
    sched.add_request(make_request("top", 20, 8, 0, priority=0))  # 5 blocks, outranks all
    sched.add_request(make_request("low", 4, 8, 1, priority=9))   # 1 block
    sim_step(sched)
    urgent = make_request("urgent", 12, 2, 2, priority=1)  # 3 blocks: evicting "low" is not enough
    sched.add_request(urgent)
    steps, preempted = sim_step(sched)
    assert not preempted and "urgent" not in steps and steps == {"top": 1, "low": 1}


def test_urgent_arrival_preempts_for_a_sequence_slot():
    kv = KVCacheManager(num_blocks=100, block_size=4)
    sched = Priority(SchedulerConfig(2, 64, 64), kv)
    for i in range(2):
        sched.add_request(make_request(f"low{i}", 4, 8, i, priority=1))
    sim_step(sched)
    sched.add_request(make_request("urgent", 4, 8, 2, priority=0))
    steps, preempted = sim_step(sched)
    assert preempted == ["low1"] and steps == {"low0": 1, "urgent": 4}


@pytest.mark.parametrize("cls", [Chunked, Priority], ids=["chunked_prefill", "priority"])
@settings(max_examples=200, deadline=None)
@given(
    reqs=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 12), st.integers(0, 6),
                            st.integers(0, 3)), min_size=1, max_size=12),
    num_blocks=st.integers(13, 40),
    max_num_seqs=st.integers(1, 6),
    budget=st.integers(6, 24),
    chunked=st.booleans(),
    prefix_caching=st.booleans(),
    swap_blocks=st.sampled_from([0, 0, 10, 40]),
)
def test_every_request_finishes_in_order_and_every_block_returns(
        cls, reqs, num_blocks, max_num_seqs, budget, chunked, prefix_caching, swap_blocks):
    block_size = 4
    max_len = 52  # 40 prompt + 12 output
    # Prompts are 1, 2, 3, ...: every shorter one is a prefix of every longer one.
    kv = KVCacheManager(num_blocks, block_size, prefix_caching, swap_blocks)
    mode = "swap" if swap_blocks else "recompute"
    if cls is Chunked:
        config = SchedulerConfig(max_num_seqs, max(budget, max_num_seqs), max_len, True, mode)
    else:
        config = SchedulerConfig(max_num_seqs, budget if chunked else max_len, max_len, chunked,
                                 mode)
    sched = cls(config, kv)
    pending = sorted((arrive, i, p, m, prio) for i, (p, m, arrive, prio) in enumerate(reqs))
    all_reqs = []
    for step in range(2000):
        while pending and pending[0][0] <= step:
            _, i, p, m, prio = pending.pop(0)
            req = make_request(f"r{i}", p, m, i, prio)
            all_reqs.append(req)
            sched.add_request(req)
        sim_step(sched)
        if not pending and not sched.has_unfinished():
            break
    assert not sched.has_unfinished(), "scheduler stalled"
    for req in all_reqs:
        assert req.is_finished and len(req.output_token_ids) == req.max_tokens
    assert kv.num_free_blocks == num_blocks
    assert not kv.block_tables and not kv.swapped_tables
    if swap_blocks:
        assert kv.swap_pool.num_free == swap_blocks


# ---- end to end on a tiny random model ----------------------------------------------------
N_TOKENS = 16
PROMPT_LENGTHS = [3, 40, 17, 8, 29, 12, 33, 5]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _greedy():
    return SamplingParams(temperature=0, max_tokens=N_TOKENS, ignore_eos=True)


def _llm(tiny, **kwargs):
    kwargs.setdefault("num_kv_blocks", 128)
    kwargs.setdefault("block_size", 4)
    return LLM(model=str(tiny.path), dtype="float32", device="cpu", **kwargs)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    model = build_tiny_model("llama", path)
    prompts = random_prompts(PROMPT_LENGTHS, seed=1234)
    refs = [hf_greedy(model, p, N_TOKENS) for p in prompts]
    assert_well_separated(refs)  # engine runs compared token for token: no near-ties
    ns = SimpleNamespace(path=path, prompts=[{"prompt_token_ids": p} for p in prompts])
    # The reference: the default scheduler, no chunking, room for everything.
    ns.expected = _token_ids(_llm(ns, scheduler="fcfs").generate(ns.prompts, _greedy(),
                                                                  use_tqdm=False))
    assert ns.expected == [r.tokens for r in refs]
    return ns


def _record_steps(llm, monkeypatch):
    """Per step: ({request id: new tokens}, ids that were decoding when it was scheduled)."""
    sched = llm.engine.scheduler
    real = sched.schedule
    steps = []

    def schedule():
        decoding = {r.request_id for r in sched.running if remaining(r) == 1}
        out = real()
        steps.append(({s.request.request_id: s.num_new_tokens for s in out.scheduled}, decoding))
        return out

    monkeypatch.setattr(sched, "schedule", schedule)
    return steps


def _check_chunked_run(tiny, llm, monkeypatch):
    steps = _record_steps(llm, monkeypatch)
    out = llm.generate(tiny.prompts, _greedy(), use_tqdm=False)
    assert _token_ids(out) == tiny.expected
    assert llm.engine.scheduler.config.enable_chunked_prefill
    budget = llm.engine.scheduler.config.max_num_batched_tokens
    for scheduled, decoding in steps:
        assert sum(scheduled.values()) <= budget
        assert all(scheduled.get(d) == 1 for d in decoding)  # nobody decoding skips a step
    long_id = out[PROMPT_LENGTHS.index(40)].request_id
    assert sum(1 for s, _ in steps if long_id in s and s[long_id] > 1) >= 40 // budget
    assert any(d and any(n > 1 for n in s.values()) for s, d in steps)  # decodes + chunks mixed
    _assert_all_blocks_free(llm)


def test_chunked_prefill_output_equals_unchunked_fcfs(tiny, monkeypatch):
    llm = _llm(tiny, scheduler="chunked_prefill", max_num_batched_tokens=8,
               enable_chunked_prefill=True)
    _check_chunked_run(tiny, llm, monkeypatch)


def test_selecting_chunked_prefill_alone_enables_chunking(tiny, monkeypatch):
    llm = _llm(tiny, scheduler="chunked_prefill", max_num_batched_tokens=8)
    _check_chunked_run(tiny, llm, monkeypatch)


PRIORITIES = [2, 0, 1, 2, 0, 1, 2, 0]  # the least urgent arrive first


def test_priority_under_memory_pressure_keeps_output_and_serves_urgent_first(tiny, monkeypatch):
    # 80 slots: the longest request (40 + 16) fits, but only a few of the eight at a time.
    llm = _llm(tiny, scheduler="priority", num_kv_blocks=20)
    engine = llm.engine
    real_step, finished_at, count = engine.step, {}, [0]

    def step(**kwargs):
        outs = real_step(**kwargs)
        count[0] += 1
        finished_at.update({o.request_id: count[0] for o in outs if o.finished})
        return outs

    monkeypatch.setattr(engine, "step", step)
    out = llm.generate(tiny.prompts, _greedy(), use_tqdm=False, priority=PRIORITIES)
    assert _token_ids(out) == tiny.expected
    assert llm.stats()["num_preemptions"] > 0
    done = {p: [finished_at[o.request_id] for o, q in zip(out, PRIORITIES) if q == p]
            for p in set(PRIORITIES)}
    assert max(done[0]) <= min(done[1]) and max(done[1]) <= min(done[2]), done
    _assert_all_blocks_free(llm)


def test_urgent_late_arrival_preempts_running_requests(tiny, monkeypatch):
    llm = _llm(tiny, scheduler="priority", num_kv_blocks=20)
    engine = llm.engine
    steps = _record_steps(llm, monkeypatch)
    low = [0, 2, 3, 5]  # 3 + 17 + 8 + 12 prompt tokens: 11 blocks, growing
    for i in low:
        engine.add_request(f"low{i}", tiny.prompts[i], _greedy(), priority=1)
    for _ in range(3):
        engine.step()
    free_before = llm.stats()["kv_blocks_free"]
    engine.add_request("urgent", tiny.prompts[1], _greedy(), priority=0)  # 40 tokens: 10 blocks
    assert free_before < 10
    results = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                results[o.request_id] = list(o.outputs[0].token_ids)
    assert steps[3][0].get("urgent") == 40  # admitted the step it arrived
    assert llm.stats()["num_preemptions"] > 0
    assert results["urgent"] == tiny.expected[1]
    assert all(results[f"low{i}"] == tiny.expected[i] for i in low)
    _assert_all_blocks_free(llm)
