"""SamplingParams end to end on the real model: seeds, filters, penalties, stops, logprobs."""
from __future__ import annotations

import math

import pytest
import torch

from pagedllm import SamplingParams
from pagedllm.detokenizer import IncrementalDetokenizer

pytestmark = pytest.mark.slow

PROMPTS = ["Once upon a time", "The best way to learn programming is", "My favourite food is"]


def tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_seeded_request_gives_same_tokens_alone_or_in_any_batch(smollm2_llm):
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=20, ignore_eos=True)
    alone = smollm2_llm.generate([PROMPTS[0]], seeded, use_tqdm=False)[0]
    others = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    mixed = smollm2_llm.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2]], [others, seeded, others],
                                 use_tqdm=False)
    assert mixed[1].outputs[0].token_ids == alone.outputs[0].token_ids
    other_seed = SamplingParams(temperature=1.0, top_p=0.95, seed=99, max_tokens=20, ignore_eos=True)
    different = smollm2_llm.generate([PROMPTS[0]], other_seed, use_tqdm=False)[0]
    assert different.outputs[0].token_ids != alone.outputs[0].token_ids


def test_top_k_one_and_tiny_top_p_are_greedy(smollm2_llm):
    greedy = tokens(smollm2_llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=10),
                                         use_tqdm=False))
    k1 = tokens(smollm2_llm.generate(PROMPTS, SamplingParams(temperature=1.5, top_k=1, max_tokens=10),
                                     use_tqdm=False))
    p0 = tokens(smollm2_llm.generate(PROMPTS, SamplingParams(temperature=1.5, top_p=1e-6, max_tokens=10),
                                     use_tqdm=False))
    m1 = tokens(smollm2_llm.generate(PROMPTS, SamplingParams(temperature=1.5, min_p=0.999, max_tokens=10),
                                     use_tqdm=False))
    assert greedy == k1 == p0 == m1


def test_sampled_tokens_stay_inside_top_k(smollm2_llm):
    params = SamplingParams(temperature=2.0, top_k=3, max_tokens=12, logprobs=5, seed=7,
                            ignore_eos=True)
    out = smollm2_llm.generate(PROMPTS[1], params, use_tqdm=False)[0].outputs[0]
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert lp[tok].rank <= 3


def test_logprobs_are_the_models_distribution(smollm2_llm):
    out = smollm2_llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=6, logprobs=4),
                               use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 6
    total = 0.0
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert lp[tok].rank == 1  # greedy picks the most likely token
        assert 4 <= len(lp) <= 5
        ranks = sorted(v.rank for v in lp.values())
        assert ranks[:4] == [1, 2, 3, 4]
        assert all(v.logprob <= 0 for v in lp.values())
        assert sum(math.exp(v.logprob) for v in lp.values()) <= 1.0 + 1e-5
        assert lp[tok].decoded_token is not None
        total += lp[tok].logprob
    assert out.cumulative_logprob == pytest.approx(total)


def test_stop_string_is_trimmed_and_reported(smollm2_llm):
    base = smollm2_llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=30,
                                                           ignore_eos=True), use_tqdm=False)[0]
    text = base.outputs[0].text
    stop = text[8:11]  # a piece of what greedy decoding will produce
    assert stop.strip()
    out = smollm2_llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=30, stop=[stop],
                                                          ignore_eos=True), use_tqdm=False)[0]
    c = out.outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert c.text == text[: text.index(stop)]
    kept = smollm2_llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=30, stop=stop,
                                                           include_stop_str_in_output=True,
                                                           ignore_eos=True), use_tqdm=False)[0]
    assert kept.outputs[0].text == text[: text.index(stop) + len(stop)]


def test_stop_token_ids_min_tokens_and_max_tokens(smollm2_llm):
    base = smollm2_llm.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=12,
                                                           ignore_eos=True), use_tqdm=False)[0]
    ids = base.outputs[0].token_ids
    assert base.outputs[0].finish_reason == "length" and len(ids) == 12
    stop_id = ids[4]
    out = smollm2_llm.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=12,
                                                          stop_token_ids=[stop_id]), use_tqdm=False)[0]
    first = ids.index(stop_id)
    assert out.outputs[0].token_ids == ids[: first + 1]
    assert out.outputs[0].stop_reason == stop_id
    # min_tokens forbids stopping early: the stop token cannot be chosen before then.
    late = smollm2_llm.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=12,
                                                           min_tokens=first + 2,
                                                           stop_token_ids=[stop_id]), use_tqdm=False)[0]
    assert len(late.outputs[0].token_ids) >= first + 2
    assert stop_id not in late.outputs[0].token_ids[: first + 1]


def test_eos_stops_unless_ignored(smollm2_llm):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    out = smollm2_llm.chat(msgs, SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)[0]
    eos = smollm2_llm.get_tokenizer().eos_token_id
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].token_ids[-1] == eos
    ignored = smollm2_llm.chat(msgs, SamplingParams(temperature=0, max_tokens=len(out.outputs[0].token_ids) + 3,
                                                    ignore_eos=True), use_tqdm=False)[0]
    assert ignored.outputs[0].finish_reason == "length"


def test_penalties_change_greedy_output_and_discourage_repeats(smollm2_llm):
    prompt = "List: apple, apple, apple, apple,"
    plain = smollm2_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                                 use_tqdm=False)[0].outputs[0].token_ids
    for params in (SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, repetition_penalty=1.8),
                   SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, frequency_penalty=2.0),
                   SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, presence_penalty=2.0)):
        pen = smollm2_llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
        assert pen != plain
        assert len(set(pen)) >= len(set(plain))


def test_detokenizer_never_splits_a_multibyte_character(smollm2_llm):
    tok = smollm2_llm.get_tokenizer()
    text = "Grüße aus Köln — 東京 🙂 naïve café"
    ids = tok.encode(text)
    det = IncrementalDetokenizer(tok, [], skip_special_tokens=True)
    pieces = [det.add_token(t) for t in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids)
    multi = [t for t in ids if "\ufffd" in tok.decode([t])]
    assert multi, "the text should contain tokens that are partial characters on their own"


def test_engine_generator_makes_unseeded_runs_reproducible(smollm2_path):
    from pagedllm import LLM

    params = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True)
    a = LLM(model=str(smollm2_path), seed=3, kv_cache_memory_gb=0.05)
    first = tokens(a.generate(PROMPTS, params, use_tqdm=False))
    b = LLM(model=str(smollm2_path), seed=3, kv_cache_memory_gb=0.05)
    assert tokens(b.generate(PROMPTS, params, use_tqdm=False)) == first
    torch.manual_seed(0)


def test_precomputed_greedy_ids_are_sampled_only_when_every_row_is_plain_greedy():
    # A decode graph hands the sampler its own argmax; a batch of plain greedy rows takes it
    # as it is, and any other batch chooses from the logits (so a wrong argmax would show).
    from pagedllm.request import Request
    from pagedllm.sampler import Sampler

    def request(i, **params):
        return Request(str(i), None, [1, 2, 3], SamplingParams(max_tokens=4, **params), None, i)

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    handed = torch.tensor([7, 8, 9])  # not the logits' argmax: tells which was used
    sampler = Sampler(torch.Generator().manual_seed(1))
    plain = [request(i, temperature=0) for i in range(3)]
    assert [t.token_id for t in sampler(logits, plain, None)] == logits.argmax(-1).tolist()
    got = sampler.to_host(sampler.sample(logits, plain, handed))
    assert [t.token_id for t in got] == [7, 8, 9]
    mixed = plain[:2] + [request(3, temperature=0, repetition_penalty=1.5)]
    got = sampler.to_host(sampler.sample(logits, mixed, handed))
    assert [t.token_id for t in got][:2] == logits[:2].argmax(-1).tolist()
