"""The device side of ``pagedllm.dependent_launch``'s contract: the two Triton helpers
that every kernel launched with ``pdl_launch``'s keywords calls, so the trigger's placement
is written once.  Import only where Triton is (the kernel modules do)."""
from __future__ import annotations

import triton
import triton.language as tl

try:  # programmatic dependent launch; absent in old Tritons
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # USE_PDL is then never set, and the names are never compiled
    gdc_launch_dependents = gdc_wait = None


@triton.jit
def pdl_start(USE_PDL: tl.constexpr):
    """A kernel's first act: with the early trigger (``USE_PDL == 2``) its dependents may
    launch at once."""
    if USE_PDL == 2:
        gdc_launch_dependents()


@triton.jit
def pdl_wait(USE_PDL: tl.constexpr):
    """Before a kernel's first read of what an earlier kernel of the step wrote: wait for
    them, then (``USE_PDL == 1``, the trigger after the wait) let dependents launch."""
    if USE_PDL:
        gdc_wait()
        if USE_PDL == 1:
            gdc_launch_dependents()
