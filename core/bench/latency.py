"""W2 single-stream latency (BENCHMARKS.md): batch 1, a 128-token prompt, 256 greedy output
tokens.  Reports time to first token and time per output token (medians over runs).

    pagedllm bench latency --model qwen3-0.6b --load-format dummy [--compare hf]

The floor per output token is the weight bytes over the measured copy bandwidth.
"""
from __future__ import annotations

import argparse
import statistics
import time

from pagedllm.bench.figures import HF_PEER, device_name, write_figures



def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="qwen3-0.6b")
    parser.add_argument("--load-format", default="dummy", choices=["auto", "dummy"])
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--compare", choices=["hf"], default=None)
    parser.add_argument("--json", metavar="FILE",
                        help="also write the figures (seconds, bytes) to FILE as JSON")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--trace", metavar="FILE",
                        help="write a torch.profiler Chrome trace of 20 decode steps")
    parser.add_argument("--kernel-timeline", action="store_true",
                        help="profile the batch-1 decode step's device time (graph, LM head, "
                             "argmax) and print each kernel's incremental cost")
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction,
                        default=None, help="overlap host and device (default: on for CUDA)")
    parser.add_argument("--ablate", choices=["attention", "combine"], default=None,
                        help="profiling aid: skip the attention kernels, or (triton backend, "
                             "per-head decode) only their partitions' combine; the tokens are "
                             "then meaningless, and the TPOT difference is the part's cost")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _trace_decode_steps(engine, prompt: list[int], path: str, steps: int = 20) -> None:
    """Profile ``steps`` batch-1 decode steps; print the kernels by device time and how the
    device time per step compares with the wall time per step."""
    from torch.profiler import ProfilerActivity, profile

    from pagedllm import SamplingParams

    engine.add_request("w2-trace", {"prompt_token_ids": prompt},
                       SamplingParams(temperature=0, max_tokens=steps + 10, ignore_eos=True))
    for _ in range(5):
        engine.step()
    _sync(engine.device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            engine.step()
        _sync(engine.device)
        wall = (time.perf_counter() - t) / steps
    while engine.has_unfinished_requests():
        engine.step()
    prof.export_chrome_trace(path)
    events = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in events) / steps
    print(events.table(sort_by="self_cuda_time_total", row_limit=20))
    print(f"trace: {steps} decode steps, wall {wall * 1e3:.3f} ms/step, device busy "
          f"{device_us / 1e3:.3f} ms/step (kernel time; the rest is launch gaps or host)")


def _skip_attention() -> None:
    """Make every attention backend's forward return its query as the output, launching
    nothing (this process only: it is a profiling run)."""
    from pagedllm.plugin_manager import get_registry

    def forward(self, query, key, value, kv_cache, metadata, rotary=None):
        return query

    for entry in get_registry().entries["attention"].values():
        entry.cls.forward = forward


def _device_step(engine):
    """The batch-1 decode step's device work, launchable back to back with the host out of
    the way: the captured decode graph, the LM head and the argmax.  None without CUDA
    graphs.  It replays the last decode step's inputs, whose request has finished: its K/V
    lands in a free block."""
    graphs = engine.runner.graphs
    b = graphs.batch_for(1) if graphs is not None else 0
    if not b:
        return None
    model = engine.runner.model
    # The graph the run's decode steps replayed (a short-context one where captured).
    last = engine.runner.last_graph
    length = last[1] if last is not None and last[0] == b else None

    def step():
        hidden, logits, greedy = graphs.replay(b, length)
        if logits is None:
            logits = model.compute_logits(hidden[:1])
        if greedy is None:
            logits[:1].argmax(dim=-1)

    return step


def _device_step_ms(engine, steps: int = 200) -> float | None:
    """Device time of one batch-1 decode step (``_device_step``), timed with CUDA events."""
    import torch

    step = _device_step(engine)
    if step is None:
        return None
    with torch.inference_mode():
        for _ in range(10):
            step()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            step()
        end.record()
        end.synchronize()
    return start.elapsed_time(end) / steps


def run(args) -> None:
    import torch

    from pagedllm import LLM, SamplingParams

    if args.ablate == "attention":
        _skip_attention()
    elif args.ablate == "combine":
        from pagedllm.plugins.attention.triton_backend import TritonAttentionBackend

        TritonAttentionBackend.decode_ablate_combine = True
    llm = LLM(model=args.model, load_format=args.load_format, dtype=args.dtype,
              attention_backend=args.attention_backend, max_num_seqs=8,
              enforce_eager=args.enforce_eager, async_scheduling=args.async_scheduling)
    engine = llm.engine
    prompt = [(7 * i + 3) % engine.vocab_size for i in range(args.input_len)]
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=4), use_tqdm=False)
    ttfts, tpots = [], []
    host, behind = [], 0  # per decode step: host busy (step wall minus waiting for tokens)
    for _ in range(args.runs):
        engine.add_request("w2", {"prompt_token_ids": prompt}, params)
        _sync(engine.device)
        start = time.perf_counter()
        times = []
        while engine.has_unfinished_requests():
            engine.sampler.last_wait_s = 0.0
            t = time.perf_counter()
            emitted = engine.step()
            now = time.perf_counter()
            if times:  # a decode step (the first token ends the prompt's)
                wait = engine.sampler.last_wait_s
                host.append(now - t - wait)
                behind += wait > 50e-6
            if emitted:  # a token is on the host (no sync needed: the step read it)
                times.append(now)
        ttfts.append(times[0] - start)
        tpots.append((times[-1] - times[0]) / (len(times) - 1))
    rows = [("pagedllm", statistics.median(ttfts), statistics.median(tpots))]
    device_ms = _device_step_ms(engine) if engine.device.type == "cuda" else None
    if args.trace:
        _trace_decode_steps(engine, prompt, args.trace)
    timeline_step = _device_step(engine) if args.kernel_timeline else None
    if timeline_step is not None:
        from pagedllm.bench import kernel_timeline as kt

        with torch.inference_mode():
            steps = 20
            kernels = kt.profile_kernels(timeline_step, steps)
        print(f"\nkernel timeline of the device step ({steps} steps, {len(kernels)} kernels)")
        kt.print_table(kt.summarize(kernels, steps))
        per = len(kernels) // steps
        kt.print_sequence(kernels, per * (steps // 2), 16)
    if args.compare == "hf":
        from pagedllm.bench.hardware import hf_twin

        hf = hf_twin(engine)
        ids = torch.tensor([prompt], device=engine.device)
        hf_ttft, hf_tpot = [], []
        with torch.no_grad():
            hf.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
            for _ in range(args.runs):
                _sync(engine.device)
                t0 = time.perf_counter()
                hf.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0)
                _sync(engine.device)
                t1 = time.perf_counter()
                hf.generate(ids, max_new_tokens=args.output_len, min_new_tokens=args.output_len,
                            do_sample=False, pad_token_id=0)
                _sync(engine.device)
                t2 = time.perf_counter()
                hf_ttft.append(t1 - t0)
                hf_tpot.append((t2 - t1 - (t1 - t0)) / (args.output_len - 1))
        rows.append((HF_PEER, statistics.median(hf_ttft), statistics.median(hf_tpot)))
    print(f"\nW2 latency: prompt {args.input_len}, output {args.output_len}, batch 1, model "
          f"{args.model}, dtype {str(engine.dtype)[6:]}, attention {engine.attention_cls.name}, "
          f"device {engine.device}")
    floor = None
    if engine.device.type == "cuda":
        from pagedllm.bench.hardware import measure_ceilings, model_bytes_and_params

        ceil = measure_ceilings()
        weight_bytes, _ = model_bytes_and_params(engine.model)
        floor = weight_bytes / ceil.copy_bytes_per_s
        print(f"floor per output token: {weight_bytes / 1e9:.2f} GB of weights at "
              f"{ceil.copy_bytes_per_s / 1e12:.2f} TB/s = {floor * 1e3:.3f} ms")
    if host:  # with async scheduling the host's work hides behind a device that is behind
        print(f"pagedllm decode steps: host busy {statistics.median(host) * 1e3:.3f} ms a step "
              f"(median), the device behind in {behind / len(host):.0%} of {len(host)} steps")
    if device_ms is not None:
        ratio = f" = {device_ms * 1e-3 / floor:.2f}x the floor" if floor else ""
        print(f"pagedllm device time per decode step (graph, LM head, argmax back to back, "
              f"no host): {device_ms:.3f} ms{ratio}")
    print(f"{'engine':<26}{'TTFT ms':>10}{'TPOT ms':>10}{'TPOT/floor':>12}")
    for name, ttft, tpot in rows:
        ratio = f"{tpot / floor:.2f}x" if floor else "-"
        print(f"{name:<26}{ttft * 1e3:>10.2f}{tpot * 1e3:>10.3f}{ratio:>12}")
    if args.json:
        write_figures(args.json, {
            "workload": "W2", "model": args.model, "dtype": str(engine.dtype)[6:],
            "device": device_name(engine.device), "floor_s": floor,
            "device_step_s": device_ms * 1e-3 if device_ms is not None else None,
            "engines": {name: {"ttft_s": ttft, "tpot_s": tpot} for name, ttft, tpot in rows}})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_args(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
