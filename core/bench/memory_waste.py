"""KV memory accounting on a W1-shaped workload: slots allocated against slots holding a
token, sampled every step.  Internal waste (the unused tail of each sequence's last block)
should stay under 4 % at block size 16, as the PagedAttention paper reports.

    python -m pagedllm.bench.memory_waste [--num-requests 32] [--scale 4] [--block-size 16]

Runs on CPU with a random tiny Llama (the figure depends on lengths, not on weights);
``--scale`` divides W1's prompt and output lengths.
"""
from __future__ import annotations

import argparse
import tempfile

from pagedllm.bench.workloads import w1_requests


def tiny_random_llama(directory: str, vocab: int = 10001) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096)
    LlamaForCausalLM(config).save_pretrained(directory)


def measure(model_dir: str, num_requests: int, scale: int, block_size: int) -> dict:
    from pagedllm import LLM, SamplingParams

    reqs = w1_requests(num_requests, min_len=100 // scale, max_len=1024 // scale)
    llm = LLM(model=model_dir, device="cpu", block_size=block_size, max_num_seqs=num_requests,
              num_kv_blocks=num_requests * (2048 // scale // block_size + 2))
    engine = llm.engine
    for i, (prompt, max_tokens) in enumerate(reqs):
        engine.add_request(str(i), {"prompt_token_ids": prompt},
                           SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    allocated = used = steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        s = engine.kv_manager.stats()
        allocated += s.kv_slots_allocated
        used += s.kv_slots_used
        steps += 1
    return {"steps": steps, "waste": 1 - used / allocated, "peak_blocks": llm.stats()["kv_blocks_peak"],
            "prompt_tokens": sum(len(p) for p, _ in reqs), "output_tokens": sum(m for _, m in reqs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tiny_random_llama(d)
        r = measure(d, args.num_requests, args.scale, args.block_size)
    print(f"W1/{args.scale} x {args.num_requests} requests, block size {args.block_size}: "
          f"{r['prompt_tokens']} prompt + {r['output_tokens']} output tokens, {r['steps']} steps, "
          f"internal waste {100 * r['waste']:.2f} % of allocated KV slots (step average)")


if __name__ == "__main__":
    main()
