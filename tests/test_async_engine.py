"""AsyncLLMEngine on a tiny random model, in process: streams equal offline results, new
requests join the running batch, cancelling frees blocks at once, a request that breaks the
step fails alone, and draining aborts what outlives the timeout."""
from __future__ import annotations

import asyncio
import time

import pytest

from pagedllm import InvalidRequestError, LLM, SamplingParams
from pagedllm.async_engine import (AsyncLLMEngine, EngineOverloadedError, EngineStoppedError,
                                   RequestFailedError)

from tiny_models import build_tiny_model, random_prompts

ENGINE = dict(device="cpu", num_kv_blocks=64, block_size=8, max_model_len=256)
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": p} for p in random_prompts([5, 17, 9, 30], seed=7)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama-async")
    build_tiny_model("llama", d)
    return d


@pytest.fixture(scope="module")
def offline(model_dir):
    llm = LLM(model=str(model_dir), **ENGINE)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


@pytest.fixture
def engine(model_dir):
    eng = AsyncLLMEngine(LLM(model=str(model_dir), **ENGINE).engine)
    eng.start()
    yield eng
    eng.shutdown()
    assert not eng.is_running


def run(coro, timeout: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


async def final(stream):
    last = None
    async for out in stream:
        last = out
    return last


def all_blocks_free(eng: AsyncLLMEngine) -> bool:
    s = eng.stats()
    return s["kv_blocks_free"] == s["kv_blocks_total"] and s["num_running"] == 0


def test_streams_equal_offline_and_a_new_request_joins_the_running_batch(engine, offline):
    core = engine.engine
    batches: list[set[str]] = []
    real_step = core.step

    def recording_step():
        outs = real_step()
        batches.append({r.request_id for r in core.scheduler.running} |
                       {o.request_id for o in outs})
        return outs

    core.step = recording_step

    async def main():
        a = engine.add_request("a", PROMPTS[0], GREEDY)
        seen = 0
        async for out in a:  # "b" arrives while "a" is decoding
            seen += 1
            if seen == 3:
                b = engine.add_request("b", PROMPTS[1], GREEDY)
                b_task = asyncio.ensure_future(final(b))
            last_a = out
        return last_a, await b_task

    out_a, out_b = run(main())
    assert [out_a.outputs[0].token_ids, out_b.outputs[0].token_ids] == offline[:2]
    assert out_a.finished and out_a.outputs[0].finish_reason == "length"
    assert any(batch >= {"a", "b"} for batch in batches)  # b joined a's batch
    run(until(lambda: all_blocks_free(engine)))


def test_outputs_are_cumulative_and_each_stream_gets_only_its_own(engine, offline):
    async def main():
        streams = [engine.add_request(f"r{i}", p, GREEDY) for i, p in enumerate(PROMPTS)]
        results = []
        for s in streams:
            lengths = []
            async for out in s:
                assert out.request_id == s.request_id
                lengths.append(len(out.outputs[0].token_ids))
            results.append((lengths, out))
        return results

    for (lengths, out), want in zip(run(main()), offline):
        assert lengths == sorted(lengths) and lengths[-1] == len(want)
        assert out.outputs[0].token_ids == want


def test_cancelling_the_consumer_aborts_and_frees_blocks(engine):
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def main():
        stream = engine.add_request("long", PROMPTS[3], long)
        got = []

        async def consume():
            async for out in stream:
                got.append(out)

        task = asyncio.ensure_future(consume())
        await until(lambda: len(got) >= 2)
        assert engine.stats()["kv_blocks_free"] < engine.stats()["kv_blocks_total"]
        task.cancel()
        await until(lambda: all_blocks_free(engine), timeout=2.0)
        assert not engine.engine.has_unfinished_requests()
        assert engine.num_unfinished == 0
        return len(got[-1].outputs[0].token_ids)

    assert run(main()) < 200


def test_invalid_request_raises_before_any_stream(engine):
    async def main():
        with pytest.raises(InvalidRequestError) as bad_prompt:
            engine.add_request("x", {"prompt_token_ids": [10**6]}, GREEDY)
        assert bad_prompt.value.field == "prompt_token_ids"
        with pytest.raises(InvalidRequestError) as too_long:
            engine.add_requests([("ok", PROMPTS[0], GREEDY),
                                 ("bad", PROMPTS[1], SamplingParams(max_tokens=10_000))])
        assert too_long.value.field == "max_tokens" and too_long.value.index == 1
        assert engine.num_unfinished == 0  # all or nothing: "ok" was not started either
        return await final(engine.add_request("after", PROMPTS[0], GREEDY))

    assert run(main()).finished


def test_a_request_that_breaks_the_step_fails_alone(engine, offline):
    core = engine.engine
    real_sample = core.sampler.sample

    def sample(logits, requests, greedy_ids=None):
        # The poisoned request (seed 1234) breaks every step it is in, from its 3rd token.
        if any(r.params.seed == 1234 and len(r.output_token_ids) >= 2 for r in requests):
            raise RuntimeError("poisoned batch")
        return real_sample(logits, requests, greedy_ids)

    core.sampler.sample = sample
    poison = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, seed=1234)

    async def main():
        good = [engine.add_request(f"g{i}", p, GREEDY) for i, p in enumerate(PROMPTS)]
        bad = engine.add_request("bad", PROMPTS[0], poison)
        bad_outputs = []

        async def consume_bad():
            async for out in bad:
                bad_outputs.append(out)

        results = await asyncio.gather(*(final(s) for s in good), consume_bad(),
                                       return_exceptions=True)
        later = await final(engine.add_request("later", PROMPTS[2], GREEDY))
        return results, bad_outputs, later

    results, bad_outputs, later = run(main())
    assert [r.outputs[0].token_ids for r in results[:4]] == offline
    assert isinstance(results[4], RequestFailedError) and "poisoned batch" in str(results[4])
    assert len(bad_outputs[-1].outputs[0].token_ids) == 2  # it streamed until it broke
    assert later.outputs[0].token_ids == offline[2]  # and the engine kept serving
    assert engine.stats()["num_failed_steps"] >= 1
    run(until(lambda: all_blocks_free(engine)))


def test_max_waiting_bounds_the_queue(model_dir):
    eng = AsyncLLMEngine(LLM(model=str(model_dir), **ENGINE, max_num_seqs=1).engine,
                         max_waiting=1)
    eng.start()
    long = SamplingParams(temperature=0, max_tokens=150, ignore_eos=True)

    async def main():
        a = eng.add_request("a", PROMPTS[0], long)
        await a.__anext__()  # "a" is running
        b = eng.add_request("b", PROMPTS[1], GREEDY)  # waits (one sequence at a time)
        with pytest.raises(EngineOverloadedError):
            eng.add_request("c", PROMPTS[2], GREEDY)
        a.abort()
        out_b = await final(b)
        return out_b

    try:
        assert run(main()).finished
    finally:
        eng.shutdown()


def test_drain_lets_requests_finish_then_aborts_at_the_timeout(engine, offline):
    async def main():
        short = engine.add_request("short", PROMPTS[0], GREEDY)
        long = engine.add_request("long", PROMPTS[1],
                                  SamplingParams(temperature=0, max_tokens=220, ignore_eos=True))
        await long.__anext__()
        drained = asyncio.ensure_future(engine.drain(timeout=0.3))
        await asyncio.sleep(0)
        with pytest.raises(EngineStoppedError):
            engine.add_request("late", PROMPTS[2], GREEDY)
        return await final(short), await final(long), await drained

    out_short, out_long, clean = run(main())
    assert out_short.outputs[0].token_ids == offline[0]  # finished normally during the drain
    assert out_long.outputs[0].finish_reason == "abort" and not clean
    assert all_blocks_free(engine)
