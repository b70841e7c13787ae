"""End to end on the real default model, SmolLM2-135M-Instruct (GGUF, dequantized at load)."""
from __future__ import annotations

import pytest
import torch

from pagedllm import SamplingParams

from tiny_models import agreeing_prefix

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
    logits, _ = engine.runner.execute(model_input)
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


def test_bf16_stays_as_close_to_fp32_as_hf_bf16_does(smollm2_path, smollm2_llm, hf_model):
    """bf16 weights, activations and KV cache against the fp32 engine on a trained model,
    with HF transformers' own bf16 as the bar: a 135M model's bf16 rounding flips a close
    choice within 32 tokens on about half the prompts, in HF as in any engine.  Ours must
    keep as many 32-token continuations identical as HF's bf16 (less one), agree on the
    first 8 tokens of most prompts, and keep the first step's logits within 3 % (or within
    HF's own bf16 error on that prompt)."""
    import copy

    from pagedllm import LLM

    bf16 = LLM(model=str(smollm2_path), dtype="bfloat16", device="cpu")
    hf16 = copy.deepcopy(hf_model).to(torch.bfloat16)
    questions = ["What is the capital of France?", "Name three fruits.", "What is 7 times 8?",
                 "Write a haiku about rain.", "Who wrote Hamlet?", "Explain gravity briefly.",
                 "List the days of the week.", "What colour is the sky?"]
    convs = [[{"role": "user", "content": q}] for q in questions]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    want = smollm2_llm.chat(convs, params, use_tqdm=False)
    got = bf16.chat(convs, params, use_tqdm=False)
    ours, theirs = [], []
    for g, w in zip(got, want):
        ids = torch.tensor([w.prompt_token_ids])
        with torch.no_grad():
            h = hf16.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)
        ours.append(agreeing_prefix(g.outputs[0].token_ids, w.outputs[0].token_ids))
        theirs.append(agreeing_prefix(h[0, ids.shape[1]:].tolist(), w.outputs[0].token_ids))
    ids = want[0].prompt_token_ids
    ref, first = _last_logits(smollm2_llm, ids), _last_logits(bf16, ids).float()
    rel = float((first - ref).norm() / ref.norm())
    with torch.no_grad():  # HF's own bf16 error on the same prompt: the bar, as above
        hf_ref = hf_model(torch.tensor([ids])).logits[0, -1]
        hf_first = hf16(torch.tensor([ids])).logits[0, -1].float()
    hf_rel = float((hf_first - hf_ref).norm() / hf_ref.norm())
    summary = (f"tokens agreeing with fp32 before the first difference (of 32): ours {ours}, "
               f"HF bf16 {theirs}; first-step relative logit error {rel:.4f}, "
               f"HF bf16's {hf_rel:.4f}")
    print(summary)
    assert ours.count(32) >= theirs.count(32) - 1, summary
    assert sum(n >= 8 for n in ours) > len(ours) // 2, summary
    # 3 %, or no more than HF's bf16 on this prompt: with transformers 5.24's chat template
    # the first prompt's step is a close one, where HF's bf16 itself is 5.7 % off.
    assert rel < max(0.03, 1.1 * hf_rel), summary
    assert int(first.argmax()) == int(ref.argmax()), summary
