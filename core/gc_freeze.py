"""Keep Python's cyclic garbage collector off the objects that exist before a run.

A loaded engine holds hundreds of thousands of tracked objects (modules, parameters, compiled
kernels, captured graphs).  The collector's full passes walk all of them; one pass costs
hundreds of milliseconds, and a step loop that allocates lists every step triggers one every
few dozen steps, so the device sits idle while the host collects.  ``gc.freeze()`` moves the
objects alive now into a generation the collector never scans; what the run creates is
still collected as usual.  ``unfreeze`` at the end hands the old objects back, so garbage
that was pending when the run began is not leaked.
"""
from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def frozen_gc() -> Iterator[None]:
    """Within the block, full collections skip every object that existed on entry."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
