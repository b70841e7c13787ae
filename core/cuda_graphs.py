"""CUDA graphs for decode steps: one graph per batch size of a ladder, replayed with new
contents in static buffers.

A decode step's launches are the same for every batch of one size when the attention
backend promises so (``AttentionBackend.cuda_graph_decode``): then a graph captured once per
size replaces hundreds of kernel launches by one.  A batch is padded up to the next captured
size; padded rows hold token 0 at position 0 with ``seq_lens`` 1, block table row 0 and slot
-1, so they write no K/V and their outputs are dropped.  Graphs cover the model body, and
for batches up to ``logits_max_batch`` the LM head too: there the host's launch of it (a
Triton GEMV at batch 1, tens of microseconds of Python) would be a good part of the step;
there the graph also takes each row's argmax, which greedy batches sample as they are (a
kernel launched after the graph waits some microseconds for the graph to end).
Larger batches run the LM head eagerly on the rows that sample, which keeps the graphs'
memory small (every captured size keeps its outputs).

A backend may name shorter context lengths for a batch size
(``AttentionBackend.cuda_graph_context_buckets``): that size is then captured once per
length too, and a batch replays the shortest graph its longest sequence fits.
"""
from __future__ import annotations

import inspect
import os
from collections.abc import Callable

import torch

from pagedllm.attention import AttentionMetadata
from pagedllm.step_layout import StepLayout


# A graph that samples greedily stores its argmax, as int32, over its own input ids too
# (``greedy_ids(logits, ids_out=)``): a next greedy step of the same rows in the same order
# then finds its tokens in place, and the step between the graphs runs no copy kernel
# (``ModelRunner.prepare``).  Measured no faster, so off unless PAGEDLLM_GRAPH_FEEDS_IDS=1
# (H200, W2 Qwen3-0.6B, 2026-12-02 session 5): it closes the gap between graphs (TPOT equal
# to the graphs' device time) but that device time rose, 0.601 against 0.580 ms, and with
# o_proj over partitions 0.583 against 0.574, both TPOT 0.583; yet its kernel timeline
# summed 567 us against 592.  Which of the two measures misleads is open.
FEEDS_IDS = os.environ.get("PAGEDLLM_GRAPH_FEEDS_IDS", "0") == "1"


def batch_ladder(max_batch: int) -> list[int]:
    """Captured batch sizes: fine steps where padding would cost most, coarser above."""
    sizes = [1, 2, 4] + list(range(8, 65, 8)) + list(range(80, 513, 16))
    sizes = [b for b in sizes if b < max_batch]
    return sizes + [max_batch]


class DecodeGraphs:
    def __init__(self, model, kv_caches: list[torch.Tensor], device: torch.device,
                 max_batch: int, max_model_len: int, block_size: int,
                 logits_max_batch: int = 8,
                 context_buckets: Callable[[int], tuple[int, ...]] | None = None):
        self.model = model
        self.logits_max_batch = logits_max_batch
        self.kv_caches = kv_caches
        self.device = device
        self.max_model_len = max_model_len
        self.table_width = -(-max_model_len // block_size)
        self.sizes = batch_ladder(max_batch)
        # size -> the context lengths captured for it, shortest first, the model's last
        self.lengths = {b: sorted({n for n in (context_buckets(b) if context_buckets else ())
                                   if 0 < n < max_model_len}) + [max_model_len]
                        for b in self.sizes}
        b = max_batch
        # The step buffer of the largest batch: every row samples and may need a fill.
        self._buffer = torch.zeros(StepLayout(b, b, b, b, self.table_width).size,
                                   dtype=torch.int32, device=device)
        # (size, context length) -> (graph, hidden states, logits of every row or None,
        # their argmax or None)
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor,
                                                  torch.Tensor | None, torch.Tensor | None]] = {}
        greedy = getattr(model, "greedy_ids", None)
        self.feeds_ids = FEEDS_IDS and greedy is not None and (
            "ids_out" in inspect.signature(greedy).parameters)
        self._feeding: set[int] = set()  # data_ptr of each argmax that also fed its ids

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def batch_for(self, num_seqs: int) -> int:
        """The captured size a decode batch of ``num_seqs`` pads to; 0 if none fits."""
        for b in self.sizes:
            if b >= num_seqs:
                return b if (b, self.max_model_len) in self._graphs else 0
        return 0

    def context_for(self, b: int, longest: int) -> int:
        """The captured context length a batch of size ``b`` whose longest sequence has
        ``longest`` tokens replays: the shortest that fits."""
        for n in self.lengths[b]:
            if n >= longest:
                return n
        return self.max_model_len

    def buffer(self, size: int) -> torch.Tensor:
        return self._buffer[:size]

    def fed_ids(self, tokens: torch.Tensor | None) -> bool:
        """Whether ``tokens`` (a step's sampled ids) are a graph's argmax that it also
        stored over the step buffer's ids, row i at ids[i] (``FEEDS_IDS``)."""
        return tokens is not None and tokens.data_ptr() in self._feeding

    def _static_inputs(self, b: int, length: int
                       ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        w = self.table_width
        # The offsets the model runner writes a decode batch of b rows at.
        cut = StepLayout(b, b, 0, 0, w).slices()
        buf = self._buffer
        ids, pos, slots = buf[cut["ids"]], buf[cut["positions"]], buf[cut["slots"]]
        seq_lens, qsl = buf[cut["seq_lens"]], buf[cut["qsl"]]
        tables = buf[cut["tables"]].view(b, w)
        ids.zero_(), pos.zero_(), slots.fill_(-1), seq_lens.fill_(1), tables.zero_()
        qsl.copy_(torch.arange(b + 1, dtype=torch.int32, device=self.device))
        md = AttentionMetadata(
            slot_mapping=slots, query_start_loc=qsl, seq_lens=seq_lens, block_tables=tables,
            max_query_len=1, max_seq_len=length, query_lens_host=[1] * b,
            seq_lens_host=[length] * b)
        return ids, pos, md

    def _forward(self, ids, pos, md, with_logits: bool):
        hidden = self.model(ids, pos, self.kv_caches, md)
        if not with_logits:
            return hidden, None, None
        logits = self.model.compute_logits(hidden)
        greedy = getattr(self.model, "greedy_ids", None)
        if greedy is None:
            return hidden, logits, logits.argmax(dim=-1)
        if self.feeds_ids:  # after the graph's last read of ids (its first layer)
            return hidden, logits, greedy(logits, ids_out=ids)
        return hidden, logits, greedy(logits)

    @torch.inference_mode()
    def capture(self, log: Callable[[str], None] | None = None) -> None:
        """Capture every size of the ladder, largest first (later ones reuse its memory)."""
        pool = torch.cuda.graph_pool_handle()
        before = torch.cuda.memory_reserved(self.device)
        for b, length in [(b, n) for b in reversed(self.sizes)
                          for n in reversed(self.lengths[b])]:
            ids, pos, md = self._static_inputs(b, length)
            with_logits = b <= self.logits_max_batch
            self._forward(ids, pos, md, with_logits)  # compiles kernels, sets up cuBLAS
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out, logits, greedy = self._forward(ids, pos, md, with_logits)
            self._graphs[(b, length)] = (graph, out, logits, greedy)
            if self.feeds_ids and greedy is not None:
                self._feeding.add(greedy.data_ptr())
        torch.cuda.synchronize(self.device)
        if log:
            extra = (torch.cuda.memory_reserved(self.device) - before) / 2**20
            short = sorted({n for b in self.sizes for n in self.lengths[b][:-1]})
            log(f"CUDA graphs captured for decode batches {self.sizes[0]}..{self.sizes[-1]} "
                f"({len(self.sizes)} sizes"
                + (f", also at contexts up to {short} for small ones" if short else "")
                + f", {extra:.0f} MiB)")

    def replay(self, b: int, length: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(hidden states [b, hidden], logits [b, vocab] and their argmax [b], both None
        above logits_max_batch) of the graph for ``length`` (None: the model's)."""
        graph, out, logits, greedy = self._graphs[(b, length or self.max_model_len)]
        graph.replay()
        return out, logits, greedy
