"""The continuous-batching scheduler, driven without a model: each scheduled request
"computes" its tokens, and a request that caught up appends one fake token."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pagedllm.kv_cache import KVCacheManager
from pagedllm.plugins.schedulers.fcfs import FCFSScheduler
from pagedllm.request import Request, RequestStatus
from pagedllm.sampling_params import SamplingParams
from pagedllm.scheduler import SchedulerConfig


def make_request(i: int, prompt_len: int, max_tokens: int) -> Request:
    req = Request(f"r{i}", None, list(range(1, prompt_len + 1)),
                  SamplingParams(max_tokens=max_tokens), None, arrival_index=i)
    req.max_tokens = max_tokens
    return req


def run_step(sched: FCFSScheduler, step: int, log: dict) -> list:
    out = sched.schedule()
    cfg = sched.config
    assert len(sched.running) <= cfg.max_num_seqs
    assert out.num_batched_tokens <= cfg.max_num_batched_tokens
    ids = [s.request.request_id for s in out.scheduled]
    assert len(ids) == len(set(ids))
    for item in out.scheduled:
        req = item.request
        assert req.status == RequestStatus.RUNNING
        assert item.num_new_tokens >= 1
        # slots exist for every token this step computes
        have = len(sched.kv_cache.block_tables[req.request_id]) * sched.kv_cache.block_size
        assert have >= req.num_computed_tokens + item.num_new_tokens
        req.num_computed_tokens += item.num_new_tokens
        if req.num_computed_tokens == req.num_tokens:
            req.output_token_ids.append(7)
            log.setdefault(req.request_id, []).append(step)
            if len(req.output_token_ids) >= req.max_tokens:
                sched.finish(req, "length")
    return out.preempted


@settings(max_examples=80, deadline=None)
@given(
    reqs=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 12), st.integers(0, 6)),
                  min_size=1, max_size=12),
    num_blocks=st.integers(13, 40),
    max_num_seqs=st.integers(1, 6),
    chunked=st.booleans(),
)
def test_every_request_finishes_and_every_block_returns(reqs, num_blocks, max_num_seqs, chunked):
    block_size = 4
    max_len = 52  # 40 prompt + 12 output
    kv = KVCacheManager(num_blocks, block_size)
    budget = 24 if chunked else max_len
    sched = FCFSScheduler(SchedulerConfig(max_num_seqs, budget, max_len, chunked), kv)
    pending = sorted(((arrive, i, p, m) for i, (p, m, arrive) in enumerate(reqs)))
    all_reqs, log = [], {}
    for step in range(2000):
        while pending and pending[0][0] <= step:
            _, i, p, m = pending.pop(0)
            req = make_request(i, p, m)
            all_reqs.append(req)
            sched.add_request(req)
        preempted = run_step(sched, step, log)
        for victim in preempted:
            assert victim.num_computed_tokens == 0
            assert victim.request_id not in kv.block_tables
        if not pending and not sched.has_unfinished():
            break
    assert not sched.has_unfinished(), "scheduler stalled"
    for req in all_reqs:
        assert req.is_finished and len(req.output_token_ids) == req.max_tokens
    assert kv.num_free_blocks == num_blocks


def test_newest_running_request_is_preempted_and_resumes():
    kv = KVCacheManager(num_blocks=6, block_size=4)
    sched = FCFSScheduler(SchedulerConfig(4, 64, 24), kv)
    old, new = make_request(0, 8, 12), make_request(1, 8, 12)
    sched.add_request(old)
    sched.add_request(new)
    log: dict = {}
    preempted_ids = []
    for step in range(100):
        preempted_ids += [r.request_id for r in run_step(sched, step, log)]
        if not sched.has_unfinished():
            break
    assert preempted_ids and set(preempted_ids) == {"r1"}
    assert new.metrics.num_preemptions >= 1 and old.metrics.num_preemptions == 0
    assert len(old.output_token_ids) == len(new.output_token_ids) == 12
    assert sched.num_preemptions == len(preempted_ids)
    assert kv.num_free_blocks == 6


def test_requests_join_and_leave_the_running_batch_each_step():
    kv = KVCacheManager(num_blocks=100, block_size=4)
    sched = FCFSScheduler(SchedulerConfig(8, 64, 64), kv)
    a = make_request(0, 5, 3)
    sched.add_request(a)
    log: dict = {}
    run_step(sched, 0, log)  # a: prefill + first token
    b = make_request(1, 6, 2)
    sched.add_request(b)
    out = sched.schedule()  # b joins while a decodes
    assert {s.request.request_id: s.num_new_tokens for s in out.scheduled} == {"r0": 1, "r1": 6}


def test_max_num_seqs_and_token_budget_limit_admission():
    kv = KVCacheManager(num_blocks=100, block_size=4)
    sched = FCFSScheduler(SchedulerConfig(2, 16, 16), kv)
    for i in range(4):
        sched.add_request(make_request(i, 6, 4))
    out = sched.schedule()
    assert [s.request.request_id for s in out.scheduled] == ["r0", "r1"]  # max_num_seqs
    kv2 = KVCacheManager(num_blocks=100, block_size=4)
    sched2 = FCFSScheduler(SchedulerConfig(8, 16, 16), kv2)
    for i in range(4):
        sched2.add_request(make_request(i, 6, 4))
    out2 = sched2.schedule()
    assert [s.request.request_id for s in out2.scheduled] == ["r0", "r1"]  # 12 of 16 tokens


def test_abort_frees_blocks_immediately():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    sched = FCFSScheduler(SchedulerConfig(4, 64, 64), kv)
    sched.add_request(make_request(0, 9, 4))
    sched.schedule()
    assert kv.num_free_blocks < 10
    assert sched.abort_request("r0") is not None
    assert kv.num_free_blocks == 10 and not sched.has_unfinished()
