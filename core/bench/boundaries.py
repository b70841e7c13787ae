"""What a kernel boundary costs on this GPU, against an in-kernel grid barrier: the numbers
that decide how many kernels a batch-1 decode step can afford.

- a chain of tiny dependent kernels (each reads what the one before wrote) in a CUDA
  graph, launched plainly and with PDL: microseconds per kernel;
- one persistent kernel whose programs meet at a grid-wide barrier (an atomic arrival
  counter, then polling) over and over: microseconds per barrier.

    python -m pagedllm.bench.boundaries [--programs 132]
"""
from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from pagedllm.bench.kernels import graphed, time_cuda

from pagedllm.pdl_kernels import pdl_start, pdl_wait


@triton.jit
def _step_kernel(x_ptr, y_ptr, USE_PDL: tl.constexpr):
    """USE_PDL as the engine's kernels take it (``dependent_launch.pdl_mode``)."""
    pdl_start(USE_PDL)
    pid = tl.program_id(0)
    pdl_wait(USE_PDL)
    # Each program reads another program's value: the step depends on the whole last one.
    v = tl.load(x_ptr + (pid + 1) % tl.num_programs(0))
    tl.store(y_ptr + pid, v + 1)


@triton.jit
def _barrier_kernel(counter_ptr, x_ptr, rounds):
    pid = tl.program_id(0)
    n = tl.num_programs(0)
    for r in range(rounds):
        # Write this round's value, arrive, wait for everyone, read a neighbour's value.
        tl.store(x_ptr + (r % 2) * n + pid, r + pid)
        tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")
        target = (r + 1) * n
        seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
        while seen < target:
            seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
        v = tl.load(x_ptr + (r % 2) * n + (pid + 1) % n, cache_modifier=".cg")
        tl.store(x_ptr + 2 * n + pid, v)


def _graph_us(fn) -> float:
    """Median microseconds of one replay of ``fn`` captured as a CUDA graph."""
    replay = graphed(fn)
    if replay is None:
        raise RuntimeError("the benchmark's launches could not be captured in a CUDA graph")
    return time_cuda(replay, reps=5, flush_bytes=1 << 20) * 1e3


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", type=int, default=0, help="default: one per SM")
    parser.add_argument("--kernels", type=int, default=200)
    args = parser.parse_args(argv)
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    p = args.programs or sms
    bufs = [torch.zeros(p, dtype=torch.int32, device=dev) for _ in range(2)]
    n = args.kernels
    print(f"{torch.cuda.get_device_name()}: {p} programs, {n} kernels a graph")
    for name, pdl in (("plain launch", 0), ("PDL, trigger after wait", 1),
                      ("PDL, trigger at start", 2)):
        def chain():
            for j in range(n):
                _step_kernel[(p,)](bufs[j % 2], bufs[(j + 1) % 2], USE_PDL=pdl,
                                   launch_pdl=pdl > 0, num_warps=4)
        us = _graph_us(chain)
        print(f"  kernel chain, {name:<26}: {us / n:6.2f} us a kernel")
    rounds = 1000
    counter = torch.zeros(1, dtype=torch.int32, device=dev)
    x = torch.zeros(3 * p, dtype=torch.int32, device=dev)

    def barriers():
        counter.zero_()
        _barrier_kernel[(p,)](counter, x, rounds, num_warps=4)
    us = _graph_us(barriers)
    ok = bool((x[2 * p:] == torch.arange(p, device=dev).add(1).remainder(p) + rounds - 1).all())
    print(f"  grid barrier in one kernel       : {us / rounds:6.2f} us a barrier "
          f"(values seen across it: {'right' if ok else 'WRONG'})")


if __name__ == "__main__":
    main()
