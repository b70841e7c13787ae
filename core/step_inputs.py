"""A small step's integer inputs brought to the device by one kernel rather than a copy.

Between two decode graphs the device used to run the inputs' host-to-device copy (a DMA),
then the fill of the tokens the previous step sampled (a torch kernel), then the graph:
and a kernel queued behind a copy starts only some microseconds after the copy ends (the
copy engine and the SMs synchronise through the stream).  Here one Triton kernel reads the
host's pinned staging buffer over the bus (pinned memory is mapped into the device's
address space) and takes each awaited token from the previous step's sampled ids on the
way: the host writes ``-(r + 1)`` for "row r of the previous step's tokens".

Only for small steps (``MAX_ELEMENTS``): a bus read from the SMs is slower than a DMA for
big buffers, and there the step's own time hides the difference.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

# PAGEDLLM_STEP_INPUT_KERNEL=0 keeps the copy and the fill, for benchmarking.
ENABLED = os.environ.get("PAGEDLLM_STEP_INPUT_KERNEL", "1") == "1"
MAX_ELEMENTS = 8192  # int32s: 32 KiB
BLOCK = 1024


@functools.cache
def _kernel():
    if importlib.util.find_spec("triton") is None:
        return None
    try:
        import triton
        import triton.language as tl
    except Exception:
        return None

    @triton.jit
    def step_inputs_kernel(src_ptr, dst_ptr, n, prev_ptr, num_ids, BLOCK: tl.constexpr):
        """dst[:n] = src[:n], except that a negative value among the first ``num_ids``,
        -(r + 1), becomes prev[r] (an id the previous step sampled on the device)."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
        v = tl.load(src_ptr + offs, mask=ok, other=0)
        ref = ok & (offs < num_ids) & (v < 0)
        tok = tl.load(prev_ptr + tl.where(ref, -v - 1, 0), mask=ref, other=0)
        tl.store(dst_ptr + offs, tl.where(ref, tok.to(tl.int32), v), mask=ok)

    return step_inputs_kernel


def applies(n: int, device: torch.device, force: bool = False) -> bool:
    """Whether ``copy_in`` serves a step buffer of ``n`` int32s for ``device``: CUDA (or
    any with ``force``: the interpreter), Triton present, at most ``MAX_ELEMENTS``."""
    return ((force or (ENABLED and device.type == "cuda")) and 0 < n <= MAX_ELEMENTS
            and _kernel() is not None)


def copy_in(src: torch.Tensor, dst: torch.Tensor, prev: torch.Tensor | None,
            num_ids: int) -> None:
    """``dst[:] = src`` (``src``: int32, pinned host memory, or any host tensor under the
    interpreter; ``dst``: int32 on the device), with each negative value -(r + 1) among
    the first ``num_ids`` replaced by ``prev[r]`` (``prev``: the previous step's sampled
    ids, on the device; None if there are none to take)."""
    n = src.numel()
    if dst.numel() != n or src.dtype != torch.int32 or dst.dtype != torch.int32:
        raise ValueError(f"copy_in: src {src.dtype}[{n}] and dst {dst.dtype}[{dst.numel()}] "
                         "must be int32 of one size")
    if prev is None:
        prev, num_ids = dst, 0  # never read
    _kernel()[(-(-n // BLOCK),)](src, dst, n, prev, num_ids, BLOCK=BLOCK)
