"""End to end on the real default model, SmolLM2-135M-Instruct (GGUF, dequantized at load)."""
from __future__ import annotations

import pytest
import torch

from pagedllm import SamplingParams

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hf_model(smollm2_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name, dtype=torch.float32
    ).eval()


def _last_logits(llm, token_ids: list[int]) -> torch.Tensor:
    """Logits our engine computes for the token after ``token_ids`` (one prefill step)."""
    engine = llm.engine
    engine.add_request("logits-probe", {"prompt_token_ids": token_ids},
                       SamplingParams(temperature=0, max_tokens=1))
    sched = engine.scheduler.schedule()
    model_input = engine.runner.prepare(sched)
    logits = engine.runner.execute(model_input)
    engine.abort_request("logits-probe")
    return logits[0]


def test_logits_match_hf_on_the_same_dequantized_weights(smollm2_llm, hf_model):
    tok = smollm2_llm.get_tokenizer()
    for text in ["The capital of France is", "def fibonacci(n):\n    if n < 2:"]:
        ids = tok.encode(text)
        ours = _last_logits(smollm2_llm, ids)
        with torch.no_grad():
            ref = hf_model(torch.tensor([ids])).logits[0, -1]
        rel = (ours - ref).norm() / ref.norm()
        assert rel < 1e-4, f"relative logit error {rel:.2e} for {text!r}"
        assert int(ours.argmax()) == int(ref.argmax())
    assert smollm2_llm.stats()["kv_blocks_free"] == smollm2_llm.stats()["kv_blocks_total"]


def test_greedy_chat_answers_paris_and_matches_hf(smollm2_llm, hf_model):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    out = smollm2_llm.chat(messages, SamplingParams(temperature=0, max_tokens=24))[0]
    assert "Paris" in out.outputs[0].text
    tok = smollm2_llm.get_tokenizer()
    ids = out.prompt_token_ids
    ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):]
    ref = ref.tolist()
    assert out.outputs[0].token_ids == ref[: len(out.outputs[0].token_ids)]
    assert out.outputs[0].text == tok.decode(out.outputs[0].token_ids, skip_special_tokens=True)


def test_batched_chat_equals_one_at_a_time(smollm2_llm):
    questions = ["Name a primary color.", "What is 2 + 2?", "Say hello in French.",
                 "Write one word about the sea."]
    convs = [[{"role": "user", "content": q}] for q in questions]
    params = SamplingParams(temperature=0, max_tokens=16)
    batched = smollm2_llm.chat(convs, params, use_tqdm=False)
    for conv, b in zip(convs, batched):
        alone = smollm2_llm.chat(conv, params, use_tqdm=False)[0]
        assert alone.outputs[0].token_ids == b.outputs[0].token_ids
