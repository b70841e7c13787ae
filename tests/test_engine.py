"""Engine-level behaviour on tiny random models: dtypes, continuous batching, stats."""
from __future__ import annotations

import pytest
import torch

from pagedllm import LLM, SamplingParams

from tiny_models import build_tiny_model

PARAMS = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": [5, 6, 7, 8]}, {"prompt_token_ids": list(range(10, 40))}]


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen3")
    build_tiny_model("qwen3", d)
    return d


@pytest.mark.parametrize("dtype,torch_dtype", [("float32", torch.float32),
                                               ("bfloat16", torch.bfloat16),
                                               ("float16", torch.float16),
                                               ("auto", torch.float32)])
def test_dtype_sets_weights_and_cache_and_stays_close_to_fp32(qwen3_dir, dtype, torch_dtype):
    ref = LLM(model=str(qwen3_dir), dtype="float32", device="cpu", num_kv_blocks=32)
    want = [o.outputs[0].token_ids for o in ref.generate(PROMPTS, PARAMS, use_tqdm=False)]
    llm = LLM(model=str(qwen3_dir), dtype=dtype, device="cpu", num_kv_blocks=32)
    assert next(llm.engine.model.parameters()).dtype == torch_dtype
    assert llm.engine.kv_caches[0].dtype == torch_dtype
    got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)]
    # Half precision may flip a late near-tie; the first tokens must agree.
    assert all(g[:3] == w[:3] for g, w in zip(got, want))


def test_requests_join_a_running_batch_and_results_do_not_change(qwen3_dir):
    llm = LLM(model=str(qwen3_dir), device="cpu", num_kv_blocks=64)
    want = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)]
    engine = llm.engine
    engine.add_request("a", PROMPTS[0], PARAMS)
    for _ in range(3):
        engine.step()
    engine.add_request("b", PROMPTS[1], PARAMS)
    sched = engine.scheduler
    done, steps_with_both = {}, 0
    while engine.has_unfinished_requests():
        running_before = {r.request_id for r in sched.running}
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        steps_with_both += running_before == {"a", "b"}
    assert steps_with_both > 0  # "b" joined while "a" was decoding
    assert [done["a"], done["b"]] == want
    stats = llm.stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"] == 64
    assert stats["kv_blocks_peak"] >= 1 + 3  # a: 12 tokens in 1 block; b: 38 tokens in 3


def test_blocks_return_the_moment_a_request_ends(qwen3_dir):
    llm = LLM(model=str(qwen3_dir), device="cpu", num_kv_blocks=64)
    engine = llm.engine
    engine.add_request("short", PROMPTS[0], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    engine.add_request("long", PROMPTS[1], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    finished_short = False
    while engine.has_unfinished_requests():
        outs = engine.step()
        if any(o.request_id == "short" and o.finished for o in outs):
            finished_short = True
            assert "short" not in engine.kv_manager.block_tables
            assert "long" in engine.kv_manager.block_tables
    assert finished_short


def test_timing_metrics_are_recorded(qwen3_dir):
    llm = LLM(model=str(qwen3_dir), device="cpu", num_kv_blocks=16)
    out = llm.generate(PROMPTS[0], PARAMS, use_tqdm=False)[0]
    m = out.metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.last_token_time
    assert m.finished_time >= m.last_token_time and m.time_to_first_token >= 0
