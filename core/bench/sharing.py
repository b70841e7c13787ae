"""W4 (shared prefix, prefix caching on against off) and W5 (parallel sampling and beam
search against separate requests) from BENCHMARKS.md, on random weights of a preset shape.

    python -m pagedllm.bench.sharing [--model qwen3-0.6b] [--scale 1] [--kv-cache-memory-gb 40]

``--scale`` divides request counts and lengths, for small machines.
"""
from __future__ import annotations

import argparse
import random
import time

from pagedllm import LLM, SamplingParams


def _engine(args, **kw) -> LLM:
    return LLM(model=args.model, load_format="dummy", kv_cache_memory_gb=args.kv_cache_memory_gb,
               dtype=args.dtype, **kw)


def _free(llm: LLM) -> None:
    """Give the engine's KV cache back before the next engine is built."""
    import gc

    import torch

    llm.engine.kv_caches.clear()
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _run(llm: LLM, prompts, params) -> dict:
    llm.generate(prompts[:2], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    n_out = sum(len(c.token_ids) for o in outs for c in o.outputs)
    ttft = sorted(o.metrics.time_to_first_token for o in outs)
    result = {"seconds": elapsed, "tok_s": n_out / elapsed, "ttft_mean": sum(ttft) / len(ttft),
              "ttft_p50": ttft[len(ttft) // 2], **llm.stats()}
    _free(llm)
    return result


def w4(args) -> list[tuple]:
    rnd = random.Random(0)
    s = args.scale
    prefix = [rnd.randint(0, 10000) for _ in range(2048 // s)]
    prompts = [{"prompt_token_ids": prefix + [rnd.randint(0, 10000) for _ in range(128 // s)]}
               for _ in range(256 // s)]
    params = SamplingParams(temperature=0, max_tokens=128 // s, ignore_eos=True)
    rows = []
    for caching in (True, False):
        r = _run(_engine(args, enable_prefix_caching=caching), prompts, params)
        rows.append((f"W4 prefix caching {'on' if caching else 'off'}", r["tok_s"],
                     f"TTFT mean {r['ttft_mean']:.3f}s p50 {r['ttft_p50']:.3f}s, "
                     f"hit rate {r['prefix_cache_hit_rate']:.1%}, {r['seconds']:.2f}s"))
    return rows


def w5(args) -> list[tuple]:
    from pagedllm.beam_search import BeamSearchParams

    rnd = random.Random(1)
    s = args.scale
    prompts = [{"prompt_token_ids": [rnd.randint(0, 10000) for _ in range(512 // s)]}
               for _ in range(64 // s)]
    out_len = 256 // s
    rows = []
    r = _run(_engine(args, enable_prefix_caching=False), prompts, SamplingParams(n=4, temperature=1.0, seed=0, max_tokens=out_len,
                                             ignore_eos=True))
    rows.append(("W5 n=4 (copy-on-write)", r["tok_s"],
                 f"peak blocks {r['kv_blocks_peak']}, {r['seconds']:.2f}s"))
    r = _run(_engine(args, enable_prefix_caching=False), [p for p in prompts for _ in range(4)],
             SamplingParams(temperature=1.0, max_tokens=out_len, ignore_eos=True))
    rows.append(("W5 4 separate requests", r["tok_s"],
                 f"peak blocks {r['kv_blocks_peak']}, {r['seconds']:.2f}s"))
    beams = _engine(args, enable_prefix_caching=False)
    start = time.perf_counter()
    beams.beam_search(prompts, BeamSearchParams(beam_width=4, max_tokens=out_len, ignore_eos=True))
    elapsed = time.perf_counter() - start
    rows.append(("W5 beam width 4", 4 * len(prompts) * out_len / elapsed,
                 f"peak blocks {beams.stats()['kv_blocks_peak']}, {elapsed:.2f}s"))
    _free(beams)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen3-0.6b")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--scale", type=int, default=1)
    parser.add_argument("--kv-cache-memory-gb", type=float, default=30.0)
    parser.add_argument("--only", choices=["w4", "w5"], default=None)
    args = parser.parse_args()
    rows = []
    if args.only in (None, "w4"):
        rows += w4(args)
    if args.only in (None, "w5"):
        rows += w5(args)
    print(f"\n{'workload':<34}{'out tok/s':>12}  detail")
    for name, tps, detail in rows:
        print(f"{name:<34}{tps:>12.1f}  {detail}")


if __name__ == "__main__":
    main()
