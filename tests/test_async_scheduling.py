"""Async scheduling (the host queues step n+1 before reading step n's tokens) must not change
what any request gets: same tokens, texts, finish reasons, log-probabilities and seeds as the
synchronous loop, under preemption, prefix caching, forks, stops and aborts."""
from __future__ import annotations

import random

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.model_runner import PLACEHOLDER

from tiny_models import assert_all_blocks_free
from tiny_tokenizer import build_tiny_chat_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(build_tiny_chat_model(tmp_path_factory.mktemp("tiny-async"),
                                     max_position_embeddings=512, seed=1))


def _workload(vocab: int, seed: int):
    rnd = random.Random(seed)
    shared = [rnd.randrange(6, vocab) for _ in range(24)]
    prompts, params = [], []
    for i in range(14):
        ids = (shared if i % 3 == 0 else []) + [rnd.randrange(6, vocab)
                                                for _ in range(rnd.randint(3, 30))]
        prompts.append({"prompt_token_ids": ids})
        kind = i % 7
        if kind == 0:
            p = SamplingParams(temperature=0, max_tokens=rnd.randint(5, 40))  # may hit EOS
        elif kind == 1:
            p = SamplingParams(temperature=0.9, top_p=0.9, seed=i, max_tokens=30)
        elif kind == 2:
            p = SamplingParams(temperature=0, max_tokens=25, ignore_eos=True, logprobs=2)
        elif kind == 3:
            p = SamplingParams(temperature=0.8, n=2, seed=i, max_tokens=20, ignore_eos=True)
        elif kind == 4:
            p = SamplingParams(temperature=0, max_tokens=30, repetition_penalty=1.3,
                               frequency_penalty=0.5, min_tokens=8)
        elif kind == 5:
            p = SamplingParams(temperature=0, max_tokens=30, stop=["the", "?"])
        else:
            p = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
        params.append(p)
    return prompts, params


def _run(model_dir, async_scheduling: bool, **kw):
    llm = LLM(model=model_dir, device="cpu", async_scheduling=async_scheduling,
              block_size=4, max_num_seqs=kw.pop("max_num_seqs", 6), **kw)
    prompts, params = _workload(llm.engine.vocab_size, seed=7)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert_all_blocks_free(llm)
    got = []
    for o in outs:
        for c in o.outputs:
            assert PLACEHOLDER not in c.token_ids
            lps = None if c.logprobs is None else [
                {t: round(lp.logprob, 4) for t, lp in d.items()} for d in c.logprobs]
            got.append((list(c.token_ids), c.text, c.finish_reason, c.stop_reason, lps))
    return got, llm.stats()


@pytest.mark.parametrize("memory", ["ample", "recompute", "swap"])
def test_async_matches_sync(model_dir, memory, one_torch_thread):
    kw = {}
    if memory != "ample":  # few blocks: requests are preempted and come back
        kw = dict(num_kv_blocks=40, preemption_mode=memory, swap_space=0.01)
    want, sync_stats = _run(model_dir, False, **kw)
    got, async_stats = _run(model_dir, True, **kw)
    assert got == want
    assert {r for _, _, r, _, _ in want} >= {"stop", "length"}  # both ways of ending ran
    if memory != "ample":
        assert async_stats["num_preemptions"] > 0
    # Tokens past a stop are computed at most once per request that stopped early.
    stopped = sum(r == "stop" for _, _, r, _, _ in want)
    extra = async_stats["num_tokens_computed"] - sync_stats["num_tokens_computed"]
    if memory == "ample":
        assert 0 <= extra <= stopped


def test_abort_mid_flight_frees_everything(model_dir, one_torch_thread):
    llm = LLM(model=model_dir, device="cpu", async_scheduling=True, block_size=4)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    a = engine.add_request("a", {"prompt_token_ids": [7, 8, 9, 10]}, params)
    engine.add_request("b", {"prompt_token_ids": [11, 12, 13]}, params)
    for _ in range(4):
        engine.step()
    assert a.num_pending == 1 and a.output_token_ids[-1] == PLACEHOLDER  # a step in flight
    out = engine.abort_request("a")
    assert PLACEHOLDER not in out.outputs[0].token_ids and a.num_pending == 0
    assert out.finished and out.outputs[0].finish_reason == "abort"
    done = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            done[o.request_id] = o
    assert set(done) == {"b"} and len(done["b"].outputs[0].token_ids) == 50
    assert_all_blocks_free(llm)


def test_length_limited_requests_are_not_scheduled_past_their_end(model_dir, one_torch_thread):
    counts = []
    for flag in (False, True):
        llm = LLM(model=model_dir, device="cpu", async_scheduling=flag, block_size=4)
        outs = llm.generate([{"prompt_token_ids": [7, 8, 9]}] * 3,
                            [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True)
                             for m in (1, 5, 9)], use_tqdm=False)
        assert [len(o.outputs[0].token_ids) for o in outs] == [1, 5, 9]
        counts.append(llm.stats()["num_tokens_computed"])
    assert counts[0] == counts[1]
