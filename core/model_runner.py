"""Turns a scheduler decision into one flat, unpadded model batch and runs it.

Host-side metadata is built with numpy and copied to the device once per tensor; the model
returns hidden states for every scheduled token and logits only for the rows that sample.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pagedllm.attention import AttentionMetadata
from pagedllm.kv_cache import KVCacheManager
from pagedllm.request import Request
from pagedllm.scheduler import SchedulerOutput


@dataclass
class ModelInput:
    input_ids: torch.Tensor
    positions: torch.Tensor
    metadata: AttentionMetadata
    sample_rows: torch.Tensor  # indices into the token batch whose logits are needed
    sample_requests: list[Request]


class ModelRunner:
    def __init__(self, model, kv_caches: list[torch.Tensor], kv_manager: KVCacheManager,
                 device: torch.device):
        self.model = model
        self.kv_caches = kv_caches
        self.kv_manager = kv_manager
        self.device = device
        self.num_tokens_computed = 0  # every token the model has run, for tests and stats

    def prepare(self, sched: SchedulerOutput) -> ModelInput:
        bs = self.kv_manager.block_size
        ids: list[int] = []
        positions: list[np.ndarray] = []
        slots: list[np.ndarray] = []
        qlens, seq_lens, tables = [], [], []
        sample_rows, sample_requests = [], []
        for item in sched.scheduled:
            req, n = item.request, item.num_new_tokens
            start = req.num_computed_tokens
            if n == 1:
                ids.append(req.token_id_at(start))
            else:
                ids.extend(req.all_token_ids[start : start + n])
            pos = np.arange(start, start + n, dtype=np.int64)
            table = np.asarray(self.kv_manager.block_tables[req.request_id], dtype=np.int64)
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            qlens.append(n)
            seq_lens.append(start + n)
            tables.append(table)
            if start + n == req.num_tokens:  # caught up: this row's logits give the next token
                sample_rows.append(len(ids) - 1)
                sample_requests.append(req)
        max_blocks = max(len(t) for t in tables)
        block_tables = np.zeros((len(tables), max_blocks), dtype=np.int32)
        for i, t in enumerate(tables):
            block_tables[i, : len(t)] = t
        qsl = np.zeros(len(qlens) + 1, dtype=np.int32)
        np.cumsum(qlens, out=qsl[1:])
        dev = self.device
        md = AttentionMetadata(
            slot_mapping=torch.from_numpy(np.concatenate(slots)).to(dev),
            query_start_loc=torch.from_numpy(qsl).to(dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=torch.from_numpy(block_tables).to(dev),
            max_query_len=max(qlens),
            max_seq_len=max(seq_lens),
            query_lens_host=qlens,
            seq_lens_host=seq_lens,
        )
        return ModelInput(
            input_ids=torch.tensor(ids, dtype=torch.long, device=dev),
            positions=torch.from_numpy(np.concatenate(positions)).to(dev),
            metadata=md,
            sample_rows=torch.tensor(sample_rows, dtype=torch.long, device=dev),
            sample_requests=sample_requests,
        )

    @torch.inference_mode()
    def execute(self, model_input: ModelInput) -> torch.Tensor:
        """Run the batch; return logits [len(sample_requests), vocab]."""
        hidden = self.model(model_input.input_ids, model_input.positions, self.kv_caches,
                            model_input.metadata)
        self.num_tokens_computed += int(model_input.input_ids.shape[0])
        if not model_input.sample_requests:
            return hidden.new_empty((0, 0))
        return self.model.compute_logits(hidden.index_select(0, model_input.sample_rows))
