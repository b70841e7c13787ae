"""Offline chat throughput: ``LLM.chat`` against HF transformers ``generate`` on the same
weights, prompts and token counts, in one process, one after the other.

    python -m pagedllm.bench.offline_chat [--model PATH] [--num-prompts 32] [--max-tokens 64]

Both generate exactly ``max_tokens`` tokens per prompt (EOS ignored), greedy, fp32; HF runs
the whole batch at once with left padding.  Figures are output tokens per wall second.
"""
from __future__ import annotations

import argparse
import time

import torch

TOPICS = ["the ocean", "volcanoes", "bread", "chess", "the moon", "bees", "rain", "trains",
          "music", "gardens", "winter", "libraries", "bicycles", "clouds", "coffee", "forests",
          "maps", "robots", "deserts", "birds", "bridges", "tea", "mountains", "rivers",
          "paper", "stars", "cats", "football", "glass", "islands", "salt", "wind"]


def prompts(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"Tell me three facts about {TOPICS[i % len(TOPICS)]}."}]
            for i in range(n)]


def hf_peer(llm, convs, max_tokens: int) -> tuple[float, list[list[int]]]:
    from pagedllm.bench.hardware import hf_twin

    hf = hf_twin(llm.engine)
    tok = llm.get_tokenizer()
    tok.padding_side = "left"
    texts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in convs]
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    start = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(**batch, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                          do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    elapsed = time.perf_counter() - start
    return elapsed, out[:, batch["input_ids"].shape[1]:].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--skip-hf", action="store_true")
    args = parser.parse_args()

    from pagedllm import LLM, SamplingParams

    llm = LLM(model=args.model, dtype="float32", device="cpu", kv_cache_memory_gb=0.5)
    convs = prompts(args.num_prompts)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.chat(convs[:2], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outs = llm.chat(convs, params, use_tqdm=False)
    ours = time.perf_counter() - start
    n_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    rows = [("pagedllm LLM.chat", ours, n_tokens / ours)]
    agree = None
    if not args.skip_hf:
        hf_time, hf_tokens = hf_peer(llm, convs, args.max_tokens)
        rows.append(("HF transformers generate", hf_time, n_tokens / hf_time))
        agree = sum(o.outputs[0].token_ids == h for o, h in zip(outs, hf_tokens))
    print(f"\n{args.num_prompts} chat prompts x {args.max_tokens} tokens, fp32, CPU "
          f"({torch.get_num_threads()} threads)")
    print(f"{'engine':<28}{'seconds':>10}{'out tok/s':>12}")
    for name, secs, tps in rows:
        print(f"{name:<28}{secs:>10.2f}{tps:>12.1f}")
    if len(rows) == 2:
        print(f"ratio ours/HF: {rows[0][2] / rows[1][2]:.2f}x; "
              f"identical greedy outputs: {agree}/{args.num_prompts}")


if __name__ == "__main__":
    main()
