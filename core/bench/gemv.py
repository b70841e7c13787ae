"""Few-row linear layers (decode at batch 1 to 4): the Triton GEMV (``fused_ops.linear``)
against cuBLAS (``F.linear``) at the weight shapes of the presets, as bytes/s against the
copy bandwidth measured in the same run.

    python -m pagedllm.bench.gemv [--models qwen3-0.6b,llama-3.1-8b] [--rows 1,2,4] [--sweep]

Each figure is one launch's time inside a CUDA graph of many launches that cycle through
enough copies of the weight to overflow L2, as a model's distinct layers do.  The cuBLAS
column includes the separate kernel a fused prologue replaces (silu_and_mul, rms_norm).  ``--sweep``
also times a grid of tile configs and prints the best per shape (how ``gemv_config`` was
chosen; rerun it on new hardware).  GPU only.
"""
from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

from pagedllm.plugins.models import fused_ops

_COPY_BYTES = 512 << 20


def shapes(config) -> list[tuple[str, int, int, str]]:
    """(name, N, K, prologue) of a decoder's linear layers; prologue is "" (none), "silu"
    (silu(gate) * up) or "norm" (RMSNorm of x + residual, the residual stream written)."""
    h, i = config.hidden_size, config.intermediate_size
    d = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    return [("qkv_proj", q + 2 * kv, h, ""), ("qkv_proj (+norm)", q + 2 * kv, h, "norm"),
            ("o_proj", h, q, ""), ("gate_up_proj", 2 * i, h, ""),
            ("gate_up (+norm)", 2 * i, h, "norm"), ("down_proj (+silu)", h, i, "silu"),
            ("lm_head", config.vocab_size, h, "")]


def time_per_launch(make_fn, weight_bytes: int) -> float:
    """Seconds per launch of ``make_fn(copy)()`` in a graph cycling over weight copies."""
    copies = max(1, -(-_COPY_BYTES // weight_bytes))
    fns = [make_fn(c) for c in range(copies)]
    launches = max(2 * copies, 16)
    for fn in fns:  # compile, pick cuBLAS algorithms
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for j in range(launches):
            fns[j % copies]()
    graph.replay()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / launches)
    return sorted(times)[len(times) // 2]


def sweep_configs(k: int, m: int = 1):
    """One-tile configs (BLOCK_K = K rounded up to a power of two) where ``gemv_config``
    would make one tile for ``m`` rows, else tiled ones."""
    m_pad = fused_ops._next_pow2(m)
    k_pad = fused_ops._next_pow2(k)
    if not fused_ops._one_tile(k, m_pad):
        for bn, bk, warps, stages in itertools.product([2, 4, 8, 16], [256, 512, 1024],
                                                       [4, 8], [2, 4]):
            if bn * bk <= 8192:
                yield bn, bk, warps, stages
        return
    for bn, warps in itertools.product([1, 2, 4, 8, 16], [2, 4, 8]):
        if bn * m_pad * k_pad <= fused_ops.ONE_TILE_MAX_ELEMENTS:
            yield bn, k_pad, warps, 1


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="qwen3-0.6b,llama-3.1-8b")
    parser.add_argument("--rows", default="1,2,4")
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench gemv times GPU kernels; no CUDA device is available")
    from pagedllm.bench.hardware import measure_ceilings
    from pagedllm.loader.presets import preset_config

    copy_bw = measure_ceilings().copy_bytes_per_s
    dtype = torch.bfloat16
    print(f"copy bandwidth {copy_bw / 1e12:.2f} TB/s; bf16; figures are weight bytes / time")
    print(f"{'model':<14}{'layer':<19}{'N':>7}{'K':>7}{'M':>3}{'cuBLAS us':>11}{'GEMV us':>10}"
          f"{'GEMV %copy':>11}{'speedup':>9}  best sweep config")
    for model in args.models.split(","):
        config = preset_config(model)
        for name, n, k, prologue in shapes(config):
            silu = prologue == "silu"
            in_k = 2 * k if silu else k
            nw = torch.ones(k, device="cuda", dtype=dtype)
            weights = max(1, -(-_COPY_BYTES // (n * k * 2)))
            ws = [torch.randn(n, k, device="cuda", dtype=dtype) / k**0.5
                  for _ in range(min(weights, 64))]
            wb = n * k * 2
            for m in [int(r) for r in args.rows.split(",")]:
                x = torch.randn(m, in_k, device="cuda", dtype=dtype)
                r = torch.randn(m, in_k, device="cuda", dtype=dtype)

                def cublas(c, x=x, r=r):  # the unfused ops the fused kernel replaces
                    w = ws[c % len(ws)]
                    if silu:
                        return lambda: F.linear(fused_ops.silu_and_mul(x), w)
                    if prologue == "norm":
                        return lambda: F.linear(fused_ops.rms_norm(x, nw, 1e-6, r)[0], w)
                    return lambda: F.linear(x, w)

                def ours(c, x=x, r=r, cfg=None):
                    w = ws[c % len(ws)]
                    if prologue == "norm":
                        return lambda: fused_ops._gemv(x, w, None, False, False, cfg,
                                                       norm=(nw, 1e-6), residual=r)
                    return lambda: fused_ops._gemv(x, w, None, silu, False, cfg)

                t_cublas = time_per_launch(cublas, wb)
                t_ours = time_per_launch(ours, wb)
                best = ""
                if args.sweep:
                    results = []
                    for cfg in sweep_configs(k, m):
                        try:
                            t = time_per_launch(lambda c, cfg=cfg: ours(c, cfg=cfg), wb)
                        except Exception as exc:  # a config that cannot compile: skip it
                            print(f"  {cfg}: {type(exc).__name__}")
                            continue
                        results.append((t, cfg))
                    results.sort()
                    best = "  ".join(f"{c} {t * 1e6:.1f}us" for t, c in results[:3])
                print(f"{model:<14}{name:<19}{n:>7}{k:>7}{m:>3}{t_cublas * 1e6:>11.1f}"
                      f"{t_ours * 1e6:>10.1f}{100 * wb / t_ours / copy_bw:>10.0f}%"
                      f"{t_cublas / t_ours:>8.2f}x  {best}", flush=True)
            ws = None  # free the copies before the next shape
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
