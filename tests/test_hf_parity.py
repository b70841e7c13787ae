"""Greedy parity with HF transformers: same tokens, same logits, fp32 on CPU.

Every supported architecture is built as a random tiny model with transformers, saved as a
sharded checkpoint, and loaded by the engine.  The reference is HF ``generate`` run one
prompt at a time (no padding), so it is exact.  The engine's continuation must match it
token for token alone, in a mixed batch, under preemption and with chunked prefill, and in
each of those runs its logits must match HF's forward at every sampled position (the last
prompt position and each decode step) to 1e-4.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from pagedllm import LLM, SamplingParams
from tiny_models import (
    EOS,
    LLAMA3_ROPE,
    TINY_MODELS,
    assert_well_separated,
    build_tiny_model,
    default_inv_freq,
    head_dim_of,
    hf_greedy,
    hf_logits,
    random_prompts,
)
from tiny_models import assert_all_blocks_free as _assert_all_blocks_free
from tiny_models import output_token_ids as _token_ids

N_TOKENS = 16
PROMPT_LENGTHS = [3, 40, 17, 8, 29, 12]  # mixed; crosses block boundaries of 4, 8 and 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _greedy(n=N_TOKENS):
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def _as_prompts(token_lists):
    return [{"prompt_token_ids": list(p)} for p in token_lists]


def _llm(tiny, **kwargs):
    kwargs.setdefault("num_kv_blocks", 64)
    kwargs.setdefault("block_size", 8)
    return LLM(model=str(tiny.path), dtype="float32", device="cpu", **kwargs)


@pytest.fixture(scope="module", params=list(TINY_MODELS))
def tiny(request, tmp_path_factory):
    """One architecture: its checkpoint, the HF model, and greedy references for the prompts."""
    name = request.param
    path = tmp_path_factory.mktemp(name)
    model = build_tiny_model(name, path)
    prompts = random_prompts(PROMPT_LENGTHS, seed=1234)
    refs = [hf_greedy(model, p, N_TOKENS) for p in prompts]
    assert_well_separated(refs)
    ns = SimpleNamespace(
        name=name, path=path, model=model, prompts=prompts, refs=refs,
        expected=[r.tokens for r in refs],
        # HF forward logits at the positions that choose each generated token.
        expected_logits=[hf_logits(model, p + r.tokens[:-1])[len(p) - 1:]
                         for p, r in zip(prompts, refs)],
    )
    ns.llm = _llm(ns)  # shared by the tests that need no special engine settings
    return ns


def test_checkpoint_is_what_the_case_claims(tiny):
    """Guards the test design: sharded, no tokenizer, and each variant's feature present."""
    index = tiny.path / "model.safetensors.index.json"
    assert index.exists()
    shards = set(json.loads(index.read_text())["weight_map"].values())
    assert len(shards) > 1
    assert not any((tiny.path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
    assert tiny.llm.get_tokenizer() is None

    cfg = tiny.model.config
    saved = json.loads((tiny.path / "config.json").read_text())
    assert saved["architectures"] == [TINY_MODELS[tiny.name].architecture]
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA
    weight_names = json.loads(index.read_text())["weight_map"]
    if tiny.name in ("llama_tied", "qwen2"):
        assert cfg.tie_word_embeddings and "lm_head.weight" not in weight_names
    else:
        assert not cfg.tie_word_embeddings and "lm_head.weight" in weight_names
    if tiny.name == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in weight_names
    if tiny.name == "qwen3":
        assert "model.layers.0.self_attn.q_norm.weight" in weight_names
        assert head_dim_of(cfg) != cfg.hidden_size // cfg.num_attention_heads
    if tiny.name == "mistral":
        assert cfg.sliding_window is None
    if tiny.name == "llama3_rope":
        assert saved["rope_parameters"]["rope_type"] == "llama3"
        assert saved["rope_parameters"]["original_max_position_embeddings"] == \
            LLAMA3_ROPE["original_max_position_embeddings"]
        # The scaling must actually change the frequencies the prompts use.
        hf_inv_freq = tiny.model.model.rotary_emb.inv_freq.float()
        assert not torch.allclose(hf_inv_freq, default_inv_freq(head_dim_of(cfg)))
        engine_inv_freq = tiny.llm.engine.model.model.rotary._inv_freq_cpu
        torch.testing.assert_close(engine_inv_freq, hf_inv_freq, rtol=1e-6, atol=0)
    # The checkpoint names an end-of-sequence token: ignore_eos is what keeps generating.
    assert saved["eos_token_id"] == EOS


def _generate_and_check(tiny, llm, indices, monkeypatch):
    """Generate the prompts ``indices`` in one batch; check the tokens against HF generate
    and the logits the engine sampled from -- at the last prompt position and every decode
    step -- against HF's forward over the same sequence."""
    runner = llm.engine.runner
    captured: dict[str, list[tuple[int, torch.Tensor]]] = {}
    real_execute = runner.execute

    def execute(model_input):
        logits, greedy_ids = real_execute(model_input)
        for row, req in enumerate(model_input.sample_requests):
            # This row predicts the token after position num_tokens - 1.
            captured.setdefault(req.request_id, []).append(
                (req.num_tokens - 1, logits[row].detach().float().clone()))
        return logits, greedy_ids

    monkeypatch.setattr(runner, "execute", execute)
    prompts = [tiny.prompts[i] for i in indices]
    out = llm.generate(_as_prompts(prompts), _greedy(), use_tqdm=False)
    monkeypatch.undo()

    assert _token_ids(out) == [tiny.expected[i] for i in indices]
    for o, i in zip(out, indices):
        prompt, expected = tiny.prompts[i], tiny.expected_logits[i]
        assert o.outputs[0].finish_reason == "length"
        steps = captured[o.request_id]
        # One sample per position, in order, even when the request was preempted.
        assert [pos for pos, _ in steps] == list(range(len(prompt) - 1, len(prompt) - 1 + N_TOKENS))
        got = torch.stack([lg for _, lg in steps])
        torch.testing.assert_close(got[0], expected[0], rtol=1e-4, atol=1e-4,
                                   msg=lambda m: f"prompt {i}, last prompt position: {m}")
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4,
                                   msg=lambda m: f"prompt {i}, decode steps: {m}")
    _assert_all_blocks_free(llm)
    return out


def test_single_prompt(tiny, monkeypatch):
    _generate_and_check(tiny, tiny.llm, [1], monkeypatch)


def test_batch_of_mixed_lengths(tiny, monkeypatch):
    _generate_and_check(tiny, tiny.llm, range(len(tiny.prompts)), monkeypatch)


@pytest.mark.parametrize("block_size, num_kv_blocks", [(4, 20), (8, 10)])  # 80 tokens each
def test_preemption_keeps_output(tiny, block_size, num_kv_blocks, monkeypatch):
    # 80 slots hold the longest request (40 + 16 tokens) but only about two of the six at a
    # time, so decoding runs the pool dry and requests are preempted and recomputed.
    llm = _llm(tiny, block_size=block_size, num_kv_blocks=num_kv_blocks)
    _generate_and_check(tiny, llm, range(len(tiny.prompts)), monkeypatch)
    assert llm.stats()["num_preemptions"] > 0


def test_chunked_prefill_keeps_output(tiny, monkeypatch):
    # Long prompts are split into chunks that attend to their own cached context.
    llm = _llm(tiny, block_size=4, num_kv_blocks=128, enable_chunked_prefill=True,
               max_num_batched_tokens=12)
    _generate_and_check(tiny, llm, range(len(tiny.prompts)), monkeypatch)


def test_hf_reference_is_self_consistent(tiny):
    """HF generate's step logits agree with its forward, so either is a fair reference."""
    for ref, expected in zip(tiny.refs, tiny.expected_logits):
        torch.testing.assert_close(ref.step_logits, expected, rtol=1e-4, atol=1e-4)
        assert ref.tokens == expected.argmax(dim=-1).tolist()
