"""W6 decode attention, A/B: every installed attention backend on the same paged-cache decode
steps, against the device's own copy bandwidth measured in the same run.

    python -m pagedllm.bench.kernels [--batch 1,4,16,64,256] [--context 1024,4096,16384,32768]
                                     [--backends triton,torch] [--reps 20] [--json PATH]
                                     [--no-graphs]

Shapes (shared/BENCHMARKS.md, W6): 32 query heads, 8 KV heads, head_dim 128, block size 16,
bf16; every sequence in a batch decodes one token at ``context`` tokens.  Block tables are
shuffled over the whole cache, and the cache holds random data (never zeros).

A step's floor is its bytes: every cached K/V byte the step reads once, plus the new K/V
written and q/out.  Achieved bytes/s = those bytes / median step time (CUDA events around one
``backend.forward``, L2 flushed before each); the ceiling is a large device-to-device copy
(bytes read + written) timed the same way.  The step is timed as a CUDA-graph replay, as the
engine's decode steps are meant to run, so that small steps show the kernels rather than
Python's launch overhead; the eager time is printed beside it, and a backend that cannot be
captured is timed eagerly (marked ``*``).  GPU only: CPU timings of GPU kernels mean nothing.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch

from pagedllm.bench.figures import write_figures

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def time_cuda(fn, reps: int, warmup: int = 3, flush_bytes: int = 256 << 20) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` runs, L2 flushed before each."""
    flush = torch.empty(flush_bytes, dtype=torch.uint8, device="cuda")
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def graphed(fn):
    """``fn`` captured into a CUDA graph, as its replay; None if it cannot be captured (a
    backend that syncs or copies from the host inside ``forward``)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception:  # noqa: BLE001 - any capture failure means "time it eagerly"
        torch.cuda.synchronize()
        return None
    return graph.replay


def copy_bandwidth(reps: int, nbytes: int = 2 << 30) -> float:
    """Device-to-device copy, bytes read + written per second."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_cuda(lambda: dst.copy_(src), reps, flush_bytes=1 << 20)
    return 2 * nbytes / (ms * 1e-3)


def decode_step(batch: int, context: int, cls, seed: int = 0):
    """(q, k, v, kv_cache, metadata, bytes moved) for ``batch`` decodes at ``context``."""
    from pagedllm.attention import AttentionMetadata

    dev = torch.device("cuda")
    per_seq = -(-context // BLOCK_SIZE)
    num_blocks = batch * per_seq + 1
    gen = torch.Generator(device=dev).manual_seed(seed)
    shape = cls.kv_cache_shape(num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    kv_cache = torch.randn(shape, generator=gen, dtype=DTYPE, device=dev)
    perm = torch.randperm(num_blocks - 1, generator=gen, device=dev) + 1  # block 0: padding
    tables = perm.view(batch, per_seq).to(torch.int32)
    pos = context - 1
    slots = tables[:, pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE
    md = AttentionMetadata(
        slot_mapping=slots,
        query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device=dev),
        seq_lens=torch.full((batch,), context, dtype=torch.int32, device=dev),
        block_tables=tables,
        max_query_len=1, max_seq_len=context,
        query_lens_host=[1] * batch, seq_lens_host=[context] * batch,
    )
    q = torch.randn(batch, NUM_HEADS, HEAD_DIM, generator=gen, dtype=DTYPE, device=dev)
    k = torch.randn(batch, NUM_KV_HEADS, HEAD_DIM, generator=gen, dtype=DTYPE, device=dev)
    v = torch.randn(batch, NUM_KV_HEADS, HEAD_DIM, generator=gen, dtype=DTYPE, device=dev)
    item = torch.empty((), dtype=DTYPE).element_size()
    kv_read = batch * context * NUM_KV_HEADS * HEAD_DIM * 2 * item
    kv_write = batch * NUM_KV_HEADS * HEAD_DIM * 2 * item
    q_out = 2 * batch * NUM_HEADS * HEAD_DIM * item
    return q, k, v, kv_cache, md, kv_read + kv_write + q_out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=_ints, default=[1, 4, 16, 64, 128, 256])
    parser.add_argument("--context", type=_ints, default=[1024, 4096, 16384, 32768])
    parser.add_argument("--backends", default=None,
                        help="comma-separated backend names (default: every installed one)")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--json", default=None, help="also write every figure to this file")
    parser.add_argument("--no-graphs", dest="graphs", action="store_false",
                        help="time eager calls only (default: CUDA-graph replays too)")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("pagedllm.bench.kernels: needs a CUDA GPU (torch sees none); kernel timings on "
              "a CPU mean nothing, so nothing was run.", file=sys.stderr)
        return 2

    from pagedllm.plugin_manager import get_registry

    registry = get_registry()
    names = args.backends.split(",") if args.backends else registry.names("attention")
    backends = []
    for name in names:
        cls = registry.get("attention", name).cls
        if cls.supports(head_dim=HEAD_DIM, dtype=DTYPE, device=torch.device("cuda")):
            backends.append(cls)
        else:
            print(f"skipping {name}: supports(head_dim={HEAD_DIM}, dtype=bf16, cuda) is False",
                  file=sys.stderr)
    if not backends:
        print("no installed attention backend supports the W6 shapes here", file=sys.stderr)
        return 1

    props = torch.cuda.get_device_properties(0)
    bw = copy_bandwidth(args.reps)
    print(f"device {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}")
    print(f"device-to-device copy: {bw / 1e12:.2f} TB/s (read + write)")
    print(f"W6 decode: {NUM_HEADS} q / {NUM_KV_HEADS} kv heads, head_dim {HEAD_DIM}, "
          f"block {BLOCK_SIZE}, bf16; figure: us per step (CUDA-graph replay; * = eager, "
          f"the backend cannot be captured), TB/s, % of copy bandwidth, eager us")

    rows = []
    for batch in args.batch:
        for context in args.context:
            row = {"batch": batch, "context": context}
            for cls in backends:
                try:
                    q, k, v, cache, md, nbytes = decode_step(batch, context, cls,
                                                             seed=batch * 100_003 + context)
                    backend = cls(NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, HEAD_DIM**-0.5)
                    step = lambda: backend.forward(q, k, v, cache, md)  # noqa: E731
                    eager = time_cuda(step, args.reps)
                    replay = graphed(step) if args.graphs else None
                    ms = time_cuda(replay, args.reps) if replay is not None else eager
                    row[cls.name] = {"us": ms * 1e3, "eager_us": eager * 1e3,
                                     "graph": replay is not None, "bytes": nbytes,
                                     "tbps": nbytes / (ms * 1e-3) / 1e12,
                                     "of_copy": nbytes / (ms * 1e-3) / bw}
                except torch.cuda.OutOfMemoryError:
                    row[cls.name] = None
                finally:
                    q = k = v = cache = md = None
                    torch.cuda.empty_cache()
            rows.append(row)
            cells = []
            for cls in backends:
                r = row[cls.name]
                cells.append(f"{cls.name:>7}: " + ("OOM" if r is None else
                             f"{r['us']:8.1f} us{'' if r['graph'] else '*'} "
                             f"{r['tbps']:5.2f} TB/s {100 * r['of_copy']:5.1f}% "
                             f"(eager {r['eager_us']:.0f} us)"))
            print(f"B={batch:<4} ctx={context:<6} " + " | ".join(cells), flush=True)

    base = "torch"  # the reference every figure is also set against
    if len(backends) > 1 and any(cls.name == base for cls in backends):
        print(f"\nspeed-up over {base} (same inputs, same run):")
        for row in rows:
            ref = row[base]
            parts = [f"{cls.name} " + ("n/a" if row[cls.name] is None or ref is None
                                       else f"{ref['us'] / row[cls.name]['us']:.1f}x")
                     for cls in backends if cls.name != base]
            print(f"  B={row['batch']:<4} ctx={row['context']:<6} " + ", ".join(parts))
    if args.json:
        write_figures(args.json, {"device": props.name, "copy_bytes_per_s": bw, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
