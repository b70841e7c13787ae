"""W1 offline throughput (BENCHMARKS.md): 256 requests of random token ids, W1's lengths,
EOS ignored; output tokens per wall second from first submit to last finish, prefill included.

    pagedllm bench throughput --model qwen3-0.6b --load-format dummy [--compare hf]
    python -m pagedllm.bench.throughput ...

``--compare hf`` runs HF transformers ``generate`` on the same weights (static batches of 64,
left padding, sdpa) over the first ``--hf-num-requests`` requests in the same process.  The
floor: every decode step reads every weight once and every generated token reads its whole
cached context once, at the measured copy bandwidth; prefill costs 2 x params FLOP per
prompt token at the measured matmul rate.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass


from pagedllm.bench.figures import HF_PEER, device_name, write_figures
from pagedllm.bench.workloads import w1_requests


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="qwen3-0.6b", help="preset, config.json dir or checkpoint")
    parser.add_argument("--load-format", default="dummy", choices=["auto", "dummy"])
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--compare", choices=["hf"], default=None)
    parser.add_argument("--json", metavar="FILE",
                        help="also write the figures (tokens/s, the ceiling) to FILE as JSON")
    parser.add_argument("--hf-num-requests", type=int, default=64)
    parser.add_argument("--hf-batch-size", type=int, default=64)
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction,
                        default=None, help="overlap host and device (default: on for CUDA)")
    parser.add_argument("--trace", metavar="FILE",
                        help="write a torch.profiler Chrome trace of 5 steps at full batch")


def kv_bytes_per_token(engine) -> int:
    return engine._block_bytes() // engine.config.block_size


def floor_seconds(engine, reqs, ceilings) -> float:
    from pagedllm.bench.hardware import model_bytes_and_params

    weight_bytes, n_params = model_bytes_and_params(engine.model)
    per_tok = kv_bytes_per_token(engine)
    steps = max(m for _, m in reqs)
    kv_reads = sum(per_tok * sum(len(p) + i for i in range(m)) for p, m in reqs)
    prefill_flop = 2 * n_params * sum(len(p) for p, _ in reqs)
    return (steps * weight_bytes + kv_reads) / ceilings.copy_bytes_per_s + \
        prefill_flop / ceilings.matmul_flop_per_s


def run_engine(engine, prompts, params, full_batch: int, trace: str | None):
    """Submit every request, step until done; return (output tokens, per-step timings).

    Each timing is a ``StepTiming``.  With async scheduling a step that waits found the
    device still busy with the previous batch: the host's work for it was hidden behind the
    device's.  Garbage-collector pauses are counted too (the run freezes the objects that
    exist before it, as ``LLM.generate`` does, so only what the run allocates is scanned).
    """
    import gc

    from pagedllm.gc_freeze import frozen_gc

    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(f"w1-{i}", prompt, p)
    n_out, steps, traced = 0, [], None
    gc_pauses: list[float] = []
    began = [0.0]

    def on_gc(phase, info):
        if phase == "start":
            began[0] = time.perf_counter()
        else:
            gc_pauses.append(time.perf_counter() - began[0])

    gc.callbacks.append(on_gc)
    try:
        with frozen_gc():
            while engine.has_unfinished_requests():
                running = engine.scheduler.num_running
                if trace and traced is None and running >= full_batch and len(steps) > 50:
                    traced = _start_trace()
                computed = engine.runner.num_tokens_computed
                t = time.perf_counter()
                engine.sampler.last_wait_s = 0.0
                outs = engine.step(final_only=True)
                steps.append(StepTiming(running, engine.runner.num_tokens_computed - computed,
                                        time.perf_counter() - t, engine.sampler.last_wait_s))
                if traced is not None and len(traced[1]) < 5:
                    traced[1].append(1)
                    if len(traced[1]) == 5:
                        traced[0].stop()
                        traced[0].export_chrome_trace(trace)
                        print(traced[0].key_averages().table(sort_by="self_cuda_time_total",
                                                              row_limit=12), flush=True)
                for o in outs:
                    if o.finished:
                        n_out += len(o.outputs[0].token_ids)
    finally:
        gc.callbacks.remove(on_gc)
    print(f"garbage collector: {len(gc_pauses)} passes, {sum(gc_pauses) * 1e3:.1f} ms in all, "
          f"longest {max(gc_pauses, default=0) * 1e3:.1f} ms", flush=True)
    return n_out, steps


@dataclass
class StepTiming:
    running: int  # sequences running when the step began
    num_tokens: int  # tokens the model computed in the step (prompt chunks and decodes)
    wall_s: float  # the whole ``step()``
    wait_s: float  # of it, waiting for the device to hand over sampled tokens


def _start_trace():
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    prof.start()
    return prof, []


def step_report(steps: list[StepTiming], full_batch: int) -> str:
    """Where the wall time went: prompt steps, decode steps by batch size, and for each the
    median host time (wall minus waiting) and how often the device was the one behind."""
    import statistics

    def line(label: str, group: list[StepTiming]) -> str:
        if not group:
            return f"  {label:<28} none"
        wall = sum(s.wall_s for s in group)
        med = statistics.median(s.wall_s for s in group) * 1e3
        host = statistics.median(s.wall_s - s.wait_s for s in group) * 1e3
        behind = sum(s.wait_s > 50e-6 for s in group) / len(group)
        return (f"  {label:<28} {len(group):>5} steps {wall:7.2f}s  median {med:6.2f} ms, "
                f"host busy {host:6.2f} ms, device behind in {behind:4.0%}")

    prompt = [s for s in steps if s.num_tokens > s.running]
    decode = [s for s in steps if s.num_tokens <= s.running]
    big = [s for s in decode if s.running >= full_batch]
    mid = [s for s in decode if full_batch // 4 <= s.running < full_batch]
    small = [s for s in decode if s.running < full_batch // 4]
    return "\n".join([
        f"steps: {len(steps)}, {sum(s.wall_s for s in steps):.2f}s in step()",
        line("with prompt tokens", prompt),
        line(f"decode, batch >= {full_batch}", big),
        line(f"decode, batch {full_batch // 4}-{full_batch - 1}", mid),
        line(f"decode, batch < {full_batch // 4}", small),
    ])


def hf_generate_tok_s(engine, reqs, batch_size: int) -> tuple[float, int]:
    import torch

    from pagedllm.bench.hardware import hf_twin

    hf = hf_twin(engine)
    n_out, start = 0, time.perf_counter()
    for i in range(0, len(reqs), batch_size):
        chunk = reqs[i : i + batch_size]
        width = max(len(p) for p, _ in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, (p, _) in enumerate(chunk):  # left padding
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        new = max(m for _, m in chunk)
        with torch.no_grad():
            hf.generate(input_ids=ids.to(engine.device), attention_mask=mask.to(engine.device),
                        max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        n_out += sum(m for _, m in chunk)  # tokens asked for; HF computes `new` for every row
    torch.cuda.synchronize() if engine.device.type == "cuda" else None
    elapsed = time.perf_counter() - start
    del hf
    return n_out / elapsed, n_out


def run(args) -> None:
    import torch

    from pagedllm import LLM, SamplingParams

    reqs = w1_requests(args.num_requests)
    llm = LLM(model=args.model, load_format=args.load_format, dtype=args.dtype,
              attention_backend=args.attention_backend, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens,
              enforce_eager=args.enforce_eager, async_scheduling=args.async_scheduling)
    engine = llm.engine
    vocab = engine.vocab_size
    reqs = [([t % vocab for t in p], m) for p, m in reqs]
    prompts = [{"prompt_token_ids": p} for p, _ in reqs]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for _, m in reqs]
    llm.generate(prompts[:4], SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    n_out, steps = run_engine(engine, prompts, params, args.max_num_seqs, args.trace)
    elapsed = time.perf_counter() - start
    ours = n_out / elapsed
    rows = [("pagedllm", ours, f"{n_out} tokens in {elapsed:.1f}s, "
                               f"{llm.stats()['num_preemptions']} preemptions")]
    print(f"pagedllm: {ours:,.0f} output tok/s ({n_out} tokens in {elapsed:.1f}s)", flush=True)
    print(step_report(steps, args.max_num_seqs), flush=True)
    if args.compare == "hf":
        hf_reqs = reqs[: args.hf_num_requests]
        hf_tps, hf_n = hf_generate_tok_s(engine, hf_reqs, args.hf_batch_size)
        rows.append((HF_PEER, hf_tps,
                     f"{hf_n} tokens, first {len(hf_reqs)} requests, batches of {args.hf_batch_size}"))
    print(f"\nW1 throughput: {args.num_requests} requests, model {args.model} "
          f"({args.load_format}), dtype {str(engine.dtype)[6:]}, attention "
          f"{engine.attention_cls.name}, device {engine.device}")
    ceiling_tok_s = None
    if engine.device.type == "cuda":
        from pagedllm.bench.hardware import measure_ceilings

        ceil = measure_ceilings()
        floor = floor_seconds(engine, reqs, ceil)
        ceiling_tok_s = n_out / floor
        print(f"ceilings: copy {ceil.copy_bytes_per_s / 1e12:.2f} TB/s, bf16 matmul "
              f"{ceil.matmul_flop_per_s / 1e12:.0f} TFLOP/s; floor {floor:.2f}s = "
              f"{ceiling_tok_s:,.0f} output tok/s")
        rows = [(n, t, d + f"; {t / ceiling_tok_s:.1%} of the ceiling") for n, t, d in rows]
    print(f"{'engine':<26}{'out tok/s':>12}  detail")
    for name, tps, detail in rows:
        print(f"{name:<26}{tps:>12,.0f}  {detail}")
    if len(rows) > 1:
        print(f"ratio pagedllm / HF: {rows[0][1] / rows[1][1]:.1f}x")
    if args.json:
        write_figures(args.json, {
            "workload": "W1", "model": args.model, "dtype": str(engine.dtype)[6:],
            "device": device_name(engine.device), "num_requests": args.num_requests,
            "output_tokens": n_out, "ceiling_tok_s": ceiling_tok_s,
            "engines": {name: {"out_tok_s": tps} for name, tps, _ in rows}})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_args(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
