"""Turns a scheduler decision into one flat model batch and runs it, eagerly or by replaying
a CUDA graph.

Host side, a step's integer inputs (token ids, positions, slots, sequence lengths, query
starts, sample rows, block tables) are written with numpy into one pinned int32 buffer and
reach the device in a single copy (for small steps, one kernel: ``step_inputs``); the
tensors the model sees are views of it.  A token the previous step sampled but the host has
not seen yet (``-1``, see ``LLMEngine`` on async scheduling) is filled in on the device from
that step's token tensor.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pagedllm import step_inputs
from pagedllm.attention import AttentionMetadata
from pagedllm.cuda_graphs import DecodeGraphs
from pagedllm.kv_cache import KVCacheManager
from pagedllm.request import Request
from pagedllm.scheduler import SchedulerOutput
from pagedllm.step_layout import StepLayout

PLACEHOLDER = -1  # an output token sampled on the device whose value the host awaits


@dataclass
class ModelInput:
    input_ids: torch.Tensor
    positions: torch.Tensor
    metadata: AttentionMetadata
    sample_rows: torch.Tensor  # indices into the token batch whose logits are needed
    sample_requests: list[Request]
    num_tokens: int  # real tokens; ``input_ids`` may be longer (graph padding)
    graph_batch: int = 0  # > 0: replay the decode graph captured for this many rows
    graph_context: int = 0  # ... and for sequences of at most this many tokens


def _is_run(values: list[int]) -> bool:
    """Whether ``values`` are consecutive integers, ascending."""
    first = values[0]
    return values[-1] - first == len(values) - 1 and values == list(
        range(first, first + len(values)))


def fill_placeholders(input_ids: torch.Tensor, prev_tokens: torch.Tensor, dst: list[int],
                      src: list[int], dst_dev: torch.Tensor, src_dev: torch.Tensor) -> None:
    """``input_ids[dst[i]] = prev_tokens[src[i]]`` on the device (``*_dev``: the same
    indices there).  Where both are runs (a decode batch whose rows kept their order: the
    usual case) that is one copy kernel rather than a gather, a cast and a scatter, which
    at batch 1 cost the step several microseconds between its CUDA graphs."""
    if _is_run(dst) and _is_run(src):
        n = len(dst)
        input_ids[dst[0]:dst[0] + n].copy_(prev_tokens[src[0]:src[0] + n])
        return
    input_ids[dst_dev.long()] = prev_tokens.index_select(0, src_dev).to(input_ids.dtype)


class ModelRunner:
    def __init__(self, model, kv_caches: list[torch.Tensor], kv_manager: KVCacheManager,
                 device: torch.device, max_model_len: int = 0, graphs: DecodeGraphs | None = None):
        self.model = model
        self.kv_caches = kv_caches
        self.kv_manager = kv_manager
        self.device = device
        self.max_model_len = max_model_len
        self.graphs = graphs
        self.last_graph: tuple[int, int] | None = None  # (batch, context) last replayed
        self.num_tokens_computed = 0  # every token the model has run, for tests and stats
        self.num_graph_steps = 0  # steps replayed from a CUDA graph
        pin = device.type == "cuda"
        # Two staging buffers, used in turn: a step's copy may still be in flight when the
        # host prepares the next step (async scheduling).
        self._staging = [torch.empty(0, dtype=torch.int32, pin_memory=pin) for _ in range(2)]
        self._turn = 0

    def _stage(self, size: int) -> np.ndarray:
        self._turn ^= 1
        buf = self._staging[self._turn]
        if buf.numel() < size:
            buf = torch.empty(max(size, 2 * buf.numel()), dtype=torch.int32,
                              pin_memory=self.device.type == "cuda")
            self._staging[self._turn] = buf
        return buf.numpy()

    def prepare(self, sched: SchedulerOutput, prev_rows: dict[str, int] | None = None,
                prev_tokens: torch.Tensor | None = None) -> ModelInput:
        """``prev_rows``/``prev_tokens``: the unresolved previous step, request id -> row of
        its sampled-token tensor, for inputs still marked ``PLACEHOLDER`` on the host.

        This runs for every step on the host, ahead of the device: decode rows (the bulk of
        a big batch) cost a few list appends each, prompt rows are built with numpy, and the
        block tables are gathered from the KV manager's array in one call.
        """
        kv = self.kv_manager
        bs = kv.block_size
        tables_of = kv.block_tables
        items = sched.scheduled
        num_seqs = len(items)
        lens = [item.num_new_tokens for item in items]
        num_tokens = sum(lens)
        graph_batch = 0
        if self.graphs is not None and num_tokens == num_seqs:
            graph_batch = self.graphs.batch_for(num_seqs)
        rows_total = graph_batch or num_tokens
        seqs_total = graph_batch or num_seqs

        decodes = num_tokens == num_seqs  # one token a row: the lists below are the rows
        ids: list[int] | np.ndarray = [] if decodes else np.zeros(rows_total, dtype=np.int32)
        pos: list[int] | np.ndarray = [] if decodes else np.zeros(rows_total, dtype=np.int32)
        slots: list[int] | np.ndarray = [] if decodes else np.full(rows_total, -1, np.int32)
        seq_lens_host, table_rows = [], []
        sample_rows, sample_requests = [], []
        fill_dst, fill_src = [], []
        max_blocks = 0
        row_of = kv.table_array.row_of
        row = 0
        for item, n in zip(items, lens):
            req = item.request
            rid = req.request_id
            start = req.num_computed_tokens
            end = start + n
            table = tables_of[rid]
            table_rows.append(row_of[rid])
            if len(table) > max_blocks:
                max_blocks = len(table)
            if n == 1:
                tok = req.token_id_at(start)
                if tok == PLACEHOLDER:
                    src_row = prev_rows[rid]
                    fill_dst.append(row)
                    fill_src.append(src_row)
                    tok = -(src_row + 1)  # step_inputs.copy_in's reference; else filled
                slot = table[start // bs] * bs + start % bs
                if decodes:
                    ids.append(tok)
                    pos.append(start)
                    slots.append(slot)
                else:
                    ids[row], pos[row], slots[row] = tok, start, slot
            else:
                toks = req.all_token_ids[start:end]
                if PLACEHOLDER in toks:  # the engine resolves before such a step
                    raise RuntimeError(f"request {rid}: prompt rows hold an unresolved token")
                ids[row:row + n] = toks
                p = np.arange(start, end, dtype=np.int32)
                pos[row:row + n] = p
                slots[row:row + n] = np.asarray(table, dtype=np.int32)[p // bs] * bs + p % bs
            row += n
            seq_lens_host.append(end)
            if end == req.num_tokens:  # caught up: this row's logits give the next token
                sample_rows.append(row - 1)
                sample_requests.append(req)
        if graph_batch > num_seqs:
            # Padded rows: one query at position 0 of a 1-token context, written nowhere.
            pad = graph_batch - num_seqs
            ids += [0] * pad
            pos += [0] * pad
            slots += [-1] * pad
        seq_lens = seq_lens_host + [1] * (seqs_total - num_seqs)
        qlens_host = [1] * graph_batch if graph_batch else lens
        if decodes:
            qsl = range(seqs_total + 1)
        else:
            qsl = np.zeros(seqs_total + 1, dtype=np.int32)
            np.cumsum(lens, out=qsl[1:])

        width = self.graphs.table_width if graph_batch else max_blocks
        layout = StepLayout(rows_total, seqs_total, len(sample_rows), len(fill_dst), width)
        cut = layout.slices()
        size = layout.size
        host = self._stage(size)
        for name, value in (("ids", ids), ("positions", pos), ("slots", slots),
                            ("seq_lens", seq_lens), ("qsl", qsl), ("sample_rows", sample_rows),
                            ("fill_dst", fill_dst), ("fill_src", fill_src)):
            host[cut[name]] = value
        # Row i holds sequence i's blocks, then zeros up to the widest table of the step; a
        # graph batch's wider rows are not written past that (the backend reads a row only
        # up to its sequence's length), nor are its padded rows past their first block.
        tables = host[cut["tables"]].reshape(seqs_total, width)
        tables[:num_seqs, :max_blocks] = kv.table_array.array[table_rows, :max_blocks]
        tables[num_seqs:, :1] = 0
        # Every row awaiting the token in its own row of a graph's argmax that the graph
        # also stored over the ids (DecodeGraphs.fed_ids): the ids are in place already,
        # so they are not copied (the copy starts past them) and nothing fills them.
        fed = (graph_batch and len(fill_dst) == num_seqs and fill_src == fill_dst
               and self.graphs.fed_ids(prev_tokens))
        start = cut["positions"].start if fed else 0
        src = torch.from_numpy(host[start:size])
        if graph_batch:
            dev = self.graphs.buffer(size)
        else:
            dev = torch.empty(size, dtype=torch.int32, device=self.device)
        fill = bool(fill_dst) and not fed
        # A small step's inputs come in by one kernel that also takes the awaited tokens
        # (step_inputs); a big one's by a copy, then the fill.
        by_kernel = step_inputs.applies(size - start, self.device)
        if by_kernel:
            step_inputs.copy_in(src, dev[start:], prev_tokens if fill else None,
                                cut["ids"].stop - start)
        else:
            dev[start:].copy_(src, non_blocking=self.device.type == "cuda")
        view = {name: dev[s] for name, s in cut.items()}
        input_ids = view["ids"]
        if fill and not by_kernel:
            fill_placeholders(input_ids, prev_tokens, fill_dst, fill_src, view["fill_dst"],
                              view["fill_src"])
        # A graph batch declares the longest context its graph was captured for.
        context = self.graphs.context_for(graph_batch, max(seq_lens_host)) if graph_batch else 0
        md = AttentionMetadata(
            slot_mapping=view["slots"],
            query_start_loc=view["qsl"],
            seq_lens=view["seq_lens"],
            block_tables=view["tables"].view(seqs_total, width),
            max_query_len=max(lens),
            max_seq_len=context if graph_batch else max(seq_lens_host),
            query_lens_host=qlens_host,
            seq_lens_host=([context] * graph_batch) if graph_batch else seq_lens_host,
        )
        return ModelInput(input_ids, view["positions"], md, view["sample_rows"],
                          sample_requests, num_tokens, graph_batch, context)

    @torch.inference_mode()
    def execute(self, model_input: ModelInput) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Launch the batch; return logits [len(sample_requests), vocab] (not synchronized)
        and, where a decode graph computed them, their argmax per row (else None)."""
        logits = greedy = None
        if model_input.graph_batch:
            hidden, logits, greedy = self.graphs.replay(model_input.graph_batch,
                                                        model_input.graph_context)
            self.last_graph = (model_input.graph_batch, model_input.graph_context)
            self.num_graph_steps += 1
        else:
            hidden = self.model(model_input.input_ids, model_input.positions, self.kv_caches,
                                model_input.metadata)
        self.num_tokens_computed += model_input.num_tokens
        n = len(model_input.sample_requests)
        if not n:
            return hidden.new_empty((0, 0)), None
        if logits is not None and n == model_input.num_tokens:
            # The graph computed every row's logits; a decode batch samples rows 0..n-1.
            return logits[:n], greedy[:n]
        return self.model.compute_logits(hidden.index_select(0, model_input.sample_rows)), None
