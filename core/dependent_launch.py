"""Programmatic dependent launch (PDL) for Triton kernels on Hopper and later GPUs.

At decode a step is hundreds of small dependent kernels, and each normally starts only once
its predecessor has drained: a microsecond or more of idle GPU per kernel.  Launched with
PDL, a kernel may start while its predecessor finishes; it must then run Triton's
``gdc_wait()`` before it reads anything a predecessor wrote (weights, which no kernel
writes, may be read before it: the GEMV streams them while the previous kernel ends).

The contract for every kernel launched with ``launch_pdl=True``:

- it calls ``gdc_wait()`` before it reads anything its predecessor may have written
  (activations, the KV cache, scratch buffers), and writes nothing before it;
- it calls ``gdc_launch_dependents()`` (the trigger that lets the next kernel start) once
  that wait has returned (``USE_PDL == 1``), so at most one kernel runs ahead of the one
  it depends on, or as its first act (``USE_PDL == 2``): the kinds ``EARLY_TRIGGER_KINDS``
  names (the per-head decode kernel), or every kernel with ``PAGEDLLM_PDL=early``;
- before its wait it reads only what no kernel of the step writes: weights, the step's
  metadata (copied in before the step's first kernel), whole rotary tables, and the cached
  keys and values of earlier steps.  With the early trigger a kernel may start while any
  number of kernels before it still run (as many as fit on the GPU), so this is all it
  may read.  Whatever a kernel reads after its wait, every kernel before it has finished
  writing (each finished only after its own wait).

A Triton kernel keeps the first two by calling ``pagedllm.pdl_kernels.pdl_start(USE_PDL)``
as its first act and ``pdl_wait(USE_PDL)`` where it waits.

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


# Kernels that trigger their dependents at their start ("attention": the per-head decode
# kernel of small batches, ``decode_head_kernel``; the other attention kernels keep the
# trigger after the wait).  Measured on the H200 (W2
# Qwen3-0.6B, device time a step, 2026-12-02): attention alone 0.581 ms against 0.590 with
# none (o_proj then launches, and requests its weight, while attention still waits for
# qkv); every kernel 0.628, o_proj alone 0.601, the normed GEMVs 0.593, down_proj 0.636
# (their dependents' weight streams then compete with the latency-bound kernels before
# them).  Llama-3.1-8B: every kernel 4.047 against 4.102.  PAGEDLLM_PDL_EARLY overrides it
# ("" for none), for benchmarking.
EARLY_TRIGGER_KINDS = "attention"


def pdl_mode(device: torch.device, kind: str | None = None) -> int:
    """The kernels' ``USE_PDL`` for ``device``: 0 without PDL, 1 with the trigger after the
    wait, 2 with it at the kernel's start: for the kinds ``EARLY_TRIGGER_KINDS`` lists
    (``kind``: ``plain``, ``norm`` or ``silu`` for the GEMVs, ``attention``), or for every
    kernel with ``PAGEDLLM_PDL=early``."""
    if not pdl_enabled(device):
        return 0
    every, kinds = _early_trigger()
    return 2 if every or (kind is not None and kind in kinds) else 1


@functools.cache
def _early_trigger() -> tuple[bool, frozenset[str]]:
    """(every kernel triggers early, the kinds that do): the settings, read once per
    process, as every launch asks (tests clear the cache to change them)."""
    every = os.environ.get("PAGEDLLM_PDL", "1").strip().lower() in ("2", "early")
    kinds = os.environ.get("PAGEDLLM_PDL_EARLY", EARLY_TRIGGER_KINDS).replace(" ", "")
    return every, frozenset(kinds.split(","))


def pdl_launch(device: torch.device, kind: str | None = None) -> dict:
    """Launch keywords for a kernel that keeps the contract above: its ``USE_PDL``
    constexpr and Triton's ``launch_pdl``."""
    mode = pdl_mode(device, kind)
    return {"USE_PDL": mode, "launch_pdl": mode > 0}


@functools.cache
def _cuda_enabled(index: int) -> bool:
    if os.environ.get("PAGEDLLM_PDL", "1").strip() == "0":
        return False
    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on"):
        return False
    return _triton_has_gdc() and torch.cuda.get_device_capability(index)[0] >= 9
