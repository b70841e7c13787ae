"""Programmatic dependent launch (PDL) for Triton kernels on Hopper and later GPUs.

At decode a step is hundreds of small dependent kernels, and each normally starts only once
its predecessor has drained: a microsecond or more of idle GPU per kernel.  Launched with
PDL, a kernel may start while its predecessor finishes; it must then run Triton's
``gdc_wait()`` before it reads anything a predecessor wrote (weights, which no kernel
writes, may be read before it: the GEMV streams them while the previous kernel ends).

The contract for every kernel launched with ``launch_pdl=True``:

- it calls ``gdc_wait()`` before it reads anything its predecessor may have written
  (activations, the KV cache, scratch buffers), and writes nothing before it;
- it calls ``gdc_launch_dependents()`` only after that wait, so at most one kernel runs
  ahead of the one it depends on.

So when a kernel starts, every kernel before its predecessor has finished: before its wait
it may read weights and what was written two or more kernels back (the decode kernel reads
the step's metadata, copied in before the step's first kernel, the step's rotary tables,
and the cached keys and values of earlier steps so).

Kernels launched without PDL (torch's, cuBLAS's) wait for their predecessor as usual, so
PDL and plain kernels mix freely in one stream and in CUDA graphs.
"""
from __future__ import annotations

import functools
import os

import torch


@functools.cache
def _triton_has_gdc() -> bool:
    try:
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401
    except Exception:
        return False
    return True


def pdl_enabled(device: torch.device) -> bool:
    """Whether Triton kernels on ``device`` are launched with PDL: CUDA, compute capability
    9.0 or later, a Triton that has ``gdc_wait``, not the CPU interpreter, and
    ``PAGEDLLM_PDL`` not set to 0 (the switch for comparing with and without; read once
    per process, as every launch asks)."""
    if device.type != "cuda":
        return False
    return _cuda_enabled(device.index if device.index is not None
                         else torch.cuda.current_device())


@functools.cache
def _cuda_enabled(index: int) -> bool:
    if os.environ.get("PAGEDLLM_PDL", "1").strip() == "0":
        return False
    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on"):
        return False
    return _triton_has_gdc() and torch.cuda.get_device_capability(index)[0] >= 9
