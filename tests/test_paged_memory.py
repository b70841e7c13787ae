"""Memory shared and reclaimed: prefix caching, copy-on-write forks (n, best_of), swap and
recompute preemption, measured by counting tokens computed and blocks held."""
from __future__ import annotations

import random

import pytest

from pagedllm import LLM, SamplingParams


GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tiny_llama_dir):
    return tiny_llama_dir


def make(model_dir, **kw):
    kw.setdefault("num_kv_blocks", 256)
    kw.setdefault("block_size", 4)
    return LLM(model=model_dir, device="cpu", **kw)


def ids(outs):
    return [[c.token_ids for c in o.outputs] for o in outs]


def prompt(n, seed):
    rnd = random.Random(seed)
    return [rnd.randrange(3, 300) for _ in range(n)]


# ---- prefix caching -------------------------------------------------------------------------
def test_shared_prefix_is_computed_once_and_outputs_do_not_change(model_dir):
    prefix = prompt(40, 0)
    prompts = [{"prompt_token_ids": prefix + prompt(5, i)} for i in range(1, 5)]
    off = make(model_dir, enable_prefix_caching=False)
    want = ids(off.generate(prompts, GREEDY, use_tqdm=False))
    computed_off = off.stats()["num_tokens_computed"]

    on = make(model_dir)
    first = ids(on.generate(prompts[:1], GREEDY, use_tqdm=False))
    before = on.stats()["num_tokens_computed"]
    rest = ids(on.generate(prompts[1:], GREEDY, use_tqdm=False))
    assert first + rest == want
    s = on.stats()
    # each later prompt reuses the 40-token prefix: 10 full blocks of 4
    assert s["num_tokens_computed"] - before == computed_off - (computed_off // 4) - 3 * 40
    assert s["prefix_cache_hits"] == 3 * 40
    assert s["prefix_cache_queries"] == 4 * 45
    assert s["prefix_cache_hit_rate"] == pytest.approx(120 / 180)
    assert s["kv_blocks_free"] == s["kv_blocks_total"]


def test_identical_prompt_hits_all_but_its_last_token(model_dir):
    llm = make(model_dir)
    p = {"prompt_token_ids": prompt(17, 3)}
    a = ids(llm.generate(p, GREEDY, use_tqdm=False))
    before = llm.stats()["num_tokens_computed"]
    b = ids(llm.generate(p, GREEDY, use_tqdm=False))
    assert a == b
    # 16 prompt tokens come from the cache (4 full blocks); the 17th and the 9 fed-back
    # outputs are computed
    assert llm.stats()["num_tokens_computed"] - before == 1 + 9


def test_unreferenced_cached_blocks_are_evicted_lru_when_memory_is_needed(model_dir):
    llm = make(model_dir, num_kv_blocks=16)  # 64 tokens
    a = {"prompt_token_ids": prompt(20, 10)}
    b = {"prompt_token_ids": prompt(40, 11)}
    llm.generate(a, GREEDY, use_tqdm=False)
    pool = llm.engine.kv_manager.pool
    assert len(pool.cached) >= 5 and llm.stats()["kv_blocks_free"] == 16
    llm.generate(b, GREEDY, use_tqdm=False)  # needs 13 blocks: some of a's must go
    assert pool.num_evictions > 0
    before = llm.stats()["prefix_cache_hits"]
    llm.generate(b, GREEDY, use_tqdm=False)  # b's own blocks were cached last: still there
    assert llm.stats()["prefix_cache_hits"] - before == 36


def test_extra_cache_key_separates_entries(model_dir):
    llm = make(model_dir)
    p = prompt(20, 5)
    r1 = llm.engine.make_request("x1", {"prompt_token_ids": p}, GREEDY)
    r1.cache_key = b"adapter-A"
    llm.engine.submit(r1)
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
    r2 = llm.engine.make_request("x2", {"prompt_token_ids": p}, GREEDY)
    r2.cache_key = b"adapter-B"
    llm.engine.submit(r2)
    before = llm.stats()["prefix_cache_hits"]
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
    assert llm.stats()["prefix_cache_hits"] == before


# ---- copy-on-write: n and best_of -----------------------------------------------------------
def test_n4_holds_the_long_prompt_once(model_dir):
    long = {"prompt_token_ids": prompt(120, 7)}
    params = SamplingParams(n=4, temperature=1.0, seed=0, max_tokens=8, ignore_eos=True)
    shared = make(model_dir, enable_prefix_caching=False)
    out = shared.generate(long, params, use_tqdm=False)[0]
    assert len(out.outputs) == 4 and all(len(c.token_ids) == 8 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # really different samples
    separate = make(model_dir, enable_prefix_caching=False)
    separate.generate([long] * 4, SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True),
                      use_tqdm=False)
    peak_shared, peak_separate = shared.stats()["kv_blocks_peak"], separate.stats()["kv_blocks_peak"]
    # 120 prompt tokens = 30 blocks held once; each sequence adds its own tail (<= 3 blocks)
    assert peak_shared <= 30 + 4 * 3
    assert peak_separate >= 4 * 30
    assert shared.stats()["kv_blocks_free"] == shared.stats()["kv_blocks_total"]
    assert shared.stats()["num_tokens_computed"] == 120 + 4 * 7  # the prompt once


def test_forked_sequences_match_separate_seeded_requests(model_dir):
    # child i of a seeded n-request samples with seed + i, exactly like a lone request would
    p = {"prompt_token_ids": prompt(30, 9)}
    llm = make(model_dir)
    group = llm.generate(p, SamplingParams(n=3, temperature=1.0, seed=42, max_tokens=6,
                                           ignore_eos=True), use_tqdm=False)[0]
    for i, c in enumerate(group.outputs):
        alone = llm.generate(p, SamplingParams(temperature=1.0, seed=42 + i, max_tokens=6,
                                               ignore_eos=True), use_tqdm=False)[0]
        assert c.token_ids == alone.outputs[0].token_ids


def test_greedy_n_gives_identical_copies_and_best_of_ranks_by_logprob(model_dir):
    p = {"prompt_token_ids": prompt(13, 2)}
    llm = make(model_dir)
    greedy = llm.generate(p, SamplingParams(n=2, temperature=0, max_tokens=5, ignore_eos=True),
                          use_tqdm=False)[0]
    assert greedy.outputs[0].token_ids == greedy.outputs[1].token_ids
    best = llm.generate(p, SamplingParams(n=2, best_of=5, temperature=1.0, seed=1, max_tokens=5,
                                          ignore_eos=True), use_tqdm=False)[0]
    assert len(best.outputs) == 2
    lps = [c.cumulative_logprob for c in best.outputs]
    assert lps == sorted(lps, reverse=True)
    every = llm.generate(p, SamplingParams(n=5, temperature=1.0, seed=1, max_tokens=5,
                                           ignore_eos=True, logprobs=0), use_tqdm=False)[0]
    top2 = sorted((c.cumulative_logprob for c in every.outputs), reverse=True)[:2]
    assert lps == pytest.approx(top2)


# ---- preemption -----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_tiny_pool_finishes_everything_identically_and_frees_every_block(model_dir, mode):
    prompts = [{"prompt_token_ids": prompt(n, 20 + n)} for n in (30, 12, 25, 8, 35, 18)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    want = ids(make(model_dir).generate(prompts, params, use_tqdm=False))
    # one request needs at most (35 + 16) / 4 = 13 blocks; the pool holds about two
    llm = make(model_dir, num_kv_blocks=28, preemption_mode=mode, swap_space=0.01,
               enable_prefix_caching=False)
    assert ids(llm.generate(prompts, params, use_tqdm=False)) == want
    s = llm.stats()
    assert s["num_preemptions"] > 0
    if mode == "swap":
        assert s["num_swapped_out"] > 0 and s["num_swapped_in"] == s["num_swapped_out"]
        assert s["swap_blocks_free"] == s["swap_blocks_total"]
    else:
        assert s["num_swapped_out"] == 0
    assert s["kv_blocks_free"] == s["kv_blocks_total"]


def test_n4_under_memory_pressure_with_swap(model_dir):
    p = [{"prompt_token_ids": prompt(22, 31)}, {"prompt_token_ids": prompt(15, 32)}]
    params = SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=12, ignore_eos=True)
    want = ids(make(model_dir).generate(p, params, use_tqdm=False))
    llm = make(model_dir, num_kv_blocks=20, preemption_mode="swap", swap_space=0.01)
    assert ids(llm.generate(p, params, use_tqdm=False)) == want
    assert llm.stats()["num_preemptions"] > 0
    assert llm.stats()["kv_blocks_free"] == 20


def test_bad_preemption_mode_and_best_of_name_the_field(model_dir):
    with pytest.raises(ValueError, match="preemption_mode"):
        make(model_dir, preemption_mode="drop")
    from pagedllm import InvalidRequestError
    with pytest.raises(InvalidRequestError, match="best_of"):
        SamplingParams(n=3, best_of=2)


def test_w1_shaped_internal_waste_under_4_percent(tmp_path):
    from pagedllm.bench.memory_waste import measure, tiny_random_llama
    from pagedllm.bench.workloads import w1_requests

    full = w1_requests()
    assert sum(len(p) for p, _ in full) == 142_827 and sum(m for _, m in full) == 133_966
    tiny_random_llama(str(tmp_path))
    r = measure(str(tmp_path), num_requests=16, scale=4, block_size=16)
    assert 0 < r["waste"] < 0.04
