"""The packed int32 buffer that carries one step's integer inputs to the device in one copy:
which field sits where.  The model runner writes it on the host; a captured CUDA graph reads
the same offsets on the device."""
from __future__ import annotations

import functools
from dataclasses import dataclass

ALIGN = 4  # int32 elements in 16 bytes


@dataclass(frozen=True)
class StepLayout:
    """Offsets of each field in the packed int32 step buffer; ``slices()`` and ``size``
    share one layout per instance (the runner needs both every step)."""

    num_tokens: int
    num_seqs: int
    num_samples: int
    num_fills: int
    table_width: int

    def slices(self) -> dict[str, slice]:
        return self._slices

    @functools.cached_property
    def _slices(self) -> dict[str, slice]:
        # The fields a captured graph reads come first, so their offsets depend only on
        # the batch and table width; the per-step ones follow.
        sizes = [("ids", self.num_tokens), ("positions", self.num_tokens),
                 ("slots", self.num_tokens), ("seq_lens", self.num_seqs),
                 ("qsl", self.num_seqs + 1), ("tables", self.num_seqs * self.table_width),
                 ("sample_rows", self.num_samples), ("fill_dst", self.num_fills),
                 ("fill_src", self.num_fills)]
        # Each field starts on a 16-byte boundary: Triton specializes a kernel on whether
        # each pointer argument is 16-byte aligned, so offsets that moved with the batch
        # would compile new variants of the kernels mid-run (a second or more each).
        out, at = {}, 0
        for name, n in sizes:
            out[name] = slice(at, at + n)
            at += -(-n // ALIGN) * ALIGN
        return out

    @property
    def size(self) -> int:
        return self._slices["fill_src"].stop
