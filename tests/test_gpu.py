"""On a CUDA device: the engine's fp32 output equals HF transformers', bf16 stays close, and
paged-memory features behave as on CPU.  Skipped without CUDA."""
from __future__ import annotations

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.plugin_manager import get_registry

from tiny_models import TINY_MODELS, build_tiny_model, hf_greedy, random_prompts

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_fp32_on_gpu_matches_hf_token_for_token(name, tmp_path):
    hf = build_tiny_model(name, tmp_path)
    prompts = random_prompts([5, 17, 33], seed=1)
    llm = LLM(model=str(tmp_path), device="cuda", dtype="float32", num_kv_blocks=128,
              attention_backend="torch")
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                        use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == hf_greedy(hf, p, 12).tokens


@pytest.mark.parametrize("backend", get_registry().names("attention"))
def test_bf16_on_gpu_stays_close_to_fp32(backend, tmp_path):
    build_tiny_model("llama", tmp_path)
    prompts = [{"prompt_token_ids": p} for p in random_prompts([8, 20, 31, 12], seed=2)]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    ref = LLM(model=str(tmp_path), device="cuda", dtype="float32", num_kv_blocks=128,
              attention_backend="torch")
    want = [o.outputs[0].token_ids for o in ref.generate(prompts, params, use_tqdm=False)]
    llm = LLM(model=str(tmp_path), device="cuda", dtype="bfloat16", num_kv_blocks=128,
              attention_backend=backend)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert sum(g[:8] == w[:8] for g, w in zip(got, want)) >= 3


def test_swap_and_copy_on_write_on_gpu(tmp_path):
    build_tiny_model("qwen2", tmp_path)
    prompts = [{"prompt_token_ids": p} for p in random_prompts([30, 12, 25, 35], seed=3)]
    params = SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=16, ignore_eos=True)
    big = LLM(model=str(tmp_path), device="cuda", num_kv_blocks=256, block_size=4)
    want = [[c.token_ids for c in o.outputs] for o in big.generate(prompts, params, use_tqdm=False)]
    small = LLM(model=str(tmp_path), device="cuda", num_kv_blocks=30, block_size=4,
                preemption_mode="swap", swap_space=0.01)
    got = [[c.token_ids for c in o.outputs] for o in small.generate(prompts, params, use_tqdm=False)]
    assert got == want
    s = small.stats()
    assert s["num_swapped_out"] > 0 and s["kv_blocks_free"] == s["kv_blocks_total"]
