"""Where a step's device time goes when its kernels overlap (PDL): each kernel's
*incremental* time, how far its end moves the device's frontier past every earlier end.

A profiler's kernel durations add up to more than the step under programmatic dependent
launch (a kernel starts while its predecessor runs), and to less than it when there are
gaps, so neither answers "what does this kernel cost the step".  The increments do: they
sum to the span of the trace, and a kernel that finishes inside its predecessor's shadow
costs nothing.

    python -m pagedllm.bench.latency --kernel-timeline   (prints the table for W2)
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class KernelCost:
    name: str
    launches: int  # per step
    duration_us: float  # mean, first program's start to last program's end
    increment_us: float  # mean advance of the frontier of kernel ends
    start_gap_us: float  # mean start minus the previous kernel's end (negative: overlap)


def increments(kernels: list[tuple[str, float, float]]) -> list[tuple[str, float, float, float]]:
    """(name, duration, increment, start gap) per kernel, for (name, start, end) in any
    order, in start order.  The increment is ``end - frontier`` (0 when it ends earlier),
    the frontier being the latest end before it, so idle time before a kernel counts to
    it and the increments sum to the span; the first kernel's increment is its duration.
    The start gap is ``start - frontier`` (negative: it overlapped earlier kernels)."""
    out = []
    frontier = None
    for name, start, end in sorted(kernels, key=lambda k: k[1]):
        if frontier is None:
            inc, gap = end - start, 0.0
        else:
            inc, gap = max(0.0, end - frontier), start - frontier
        out.append((name, end - start, inc, gap))
        frontier = end if frontier is None else max(frontier, end)
    return out


def summarize(kernels: list[tuple[str, float, float]], steps: int) -> list[KernelCost]:
    """Per kernel name, per step, ordered by total increment (largest first)."""
    acc: dict[str, list[float]] = {}
    for name, dur, inc, gap in increments(kernels):
        a = acc.setdefault(name, [0, 0.0, 0.0, 0.0])
        a[0] += 1
        a[1] += dur
        a[2] += inc
        a[3] += gap
    rows = [KernelCost(n, a[0] / steps, a[1] / a[0], a[2] / a[0], a[3] / a[0])
            for n, a in acc.items()]
    return sorted(rows, key=lambda r: -r.launches * r.increment_us)


def profile_kernels(step: Callable[[], None], steps: int = 20) -> list[tuple[str, float, float]]:
    """(name with grid, start us, end us) of every CUDA kernel ``steps`` calls of ``step``
    launch (after a warm-up call), from a torch.profiler trace."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    finally:
        os.unlink(path)
    out = []
    for e in events:
        if e.get("cat") != "kernel" or "dur" not in e:
            continue
        grid = e.get("args", {}).get("grid")
        name = e["name"].split("(")[0][:48] + (f" {grid}" if grid else "")
        out.append((name, float(e["ts"]), float(e["ts"]) + float(e["dur"])))
    return out


def print_table(rows: list[KernelCost]) -> None:
    total = sum(r.launches * r.increment_us for r in rows)
    print(f"{'kernel (grid)':<62}{'/step':>6}{'dur us':>9}{'incr us':>9}{'gap us':>8}"
          f"{'incr/step':>10}")
    for r in rows:
        print(f"{r.name:<62}{r.launches:>6.0f}{r.duration_us:>9.2f}{r.increment_us:>9.2f}"
              f"{r.start_gap_us:>8.2f}{r.launches * r.increment_us:>10.1f}")
    print(f"{'sum of increments per step':<62}{'':>32}{total:>10.1f}")


def print_sequence(kernels: list[tuple[str, float, float]], first: int, count: int) -> None:
    """Kernels ``first`` to ``first + count`` in start order, one line each."""
    print(f"{'#':>4} {'kernel (grid)':<62}{'dur us':>9}{'incr us':>9}{'gap us':>8}")
    for j, (name, dur, inc, gap) in enumerate(increments(kernels)[first:first + count]):
        print(f"{first + j:>4} {name:<62}{dur:>9.2f}{inc:>9.2f}{gap:>8.2f}")
