"""Memory sizing: the profiling run's batch, the KV blocks a budget holds, and on a CUDA
device the cache that ``gpu_memory_utilization`` leaves room for."""
from __future__ import annotations

import gc

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pagedllm import LLM, SamplingParams
from pagedllm.memory_sizing import kv_cache_blocks, profile_lengths

from tiny_models import build_tiny_model, random_prompts


@given(st.integers(1, 70_000), st.integers(1, 600), st.integers(1, 40_000))
def test_profiling_run_is_the_largest_step_the_scheduler_can_form(batched, seqs, model_len):
    lens = profile_lengths(batched, seqs, model_len)
    assert 1 <= len(lens) <= seqs
    assert all(1 <= n <= model_len for n in lens)
    assert sum(lens) == min(batched, seqs * model_len)
    # Full-length sequences first: one short one at most, last.
    assert all(n == model_len for n in lens[:-1])


@given(st.integers(1 << 30, 200 << 30), st.floats(0.05, 1.0), st.integers(1 << 10, 64 << 20),
       st.floats(0.0, 0.5), st.floats(0.0, 0.5))
def test_kv_blocks_fill_the_budget_and_no_more(total, utilization, block, outside_f, peak_f):
    outside, peak = int(outside_f * total), int(peak_f * total)
    budget = utilization * total - outside - peak
    if budget < block:
        with pytest.raises(ValueError, match="gpu_memory_utilization: .* leaves no room"):
            kv_cache_blocks(total, outside, peak, utilization, block)
        return
    blocks = kv_cache_blocks(total, outside, peak, utilization, block)
    assert blocks * block <= budget < (blocks + 1) * block


def test_too_small_a_utilization_names_the_field_and_the_sizes():
    with pytest.raises(ValueError) as err:
        kv_cache_blocks(80 << 30, 1 << 30, 10 << 30, 0.1, 2 << 20)
    msg = str(err.value)
    assert msg.startswith("gpu_memory_utilization: 0.1 of 80.0 GiB")
    assert "10.00 GiB at peak" in msg and "1.00 GiB held outside" in msg


@pytest.mark.gpu
def test_kv_cache_takes_what_the_utilization_leaves(tmp_path):
    """Two engines, 0.2 and 0.3 of the device: the second's cache is larger by about a
    tenth of the device, each reports its capacity at startup, and what the process holds
    after a full run stays within its share (plus the CUDA graphs' pool)."""
    build_tiny_model("llama", tmp_path)
    total = torch.cuda.mem_get_info()[1]
    blocks, block_bytes = {}, 0
    for share in (0.2, 0.3):
        llm = LLM(model=str(tmp_path), device="cuda", gpu_memory_utilization=share,
                  max_num_seqs=16)
        engine = llm.engine
        block_bytes = engine._block_bytes()
        blocks[share] = engine.kv_manager.num_blocks
        prompts = [{"prompt_token_ids": p} for p in random_prompts([40] * 16, seed=5)]
        outs = llm.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True),
                            use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == 8 for o in outs)
        free, _ = torch.cuda.mem_get_info()
        # The graphs' pool for this tiny model is a few MiB; 256 MiB covers it and the
        # allocator's rounding.
        assert total - free <= share * total + (256 << 20), (share, total - free, total)
        del llm, engine, outs
        gc.collect()
        torch.cuda.empty_cache()
    extra = (blocks[0.3] - blocks[0.2]) * block_bytes
    assert abs(extra - 0.1 * total) <= 0.02 * total, (blocks, block_bytes, total)


@pytest.mark.gpu
def test_startup_reports_the_profiling_run_and_the_capacity(tmp_path):
    build_tiny_model("qwen3", tmp_path)
    from pagedllm.config import EngineConfig
    from pagedllm.engine import LLMEngine

    logs: list[str] = []
    engine = LLMEngine(EngineConfig(model=str(tmp_path), device="cuda",
                                    gpu_memory_utilization=0.2, max_num_seqs=8),
                       log=logs.append)
    n = engine.kv_manager.num_blocks
    text = "\n".join(logs)
    assert "profiling run:" in text and "KV cache gets" in text
    assert f"KV cache {n} blocks x {engine.config.block_size} = " \
           f"{n * engine.config.block_size} tokens" in text
