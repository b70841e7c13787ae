"""The ``torch`` attention backend: the reference every other backend is tested against.

Plain PyTorch, so it runs wherever torch does.  K/V live in one tensor per layer shaped
``[2, num_blocks, block_size, num_kv_heads, head_dim]`` and are read only through block
tables.  Decode rows (one query each) are batched into one gather and two matmuls; prefill
rows are handled a sequence at a time with a causal mask offset by the cached context.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pagedllm import hookimpl
from pagedllm.attention import AttentionBackend, AttentionMetadata


class TorchAttentionBackend(AttentionBackend):
    name = "torch"
    priority = 0
    block_dim = 1

    @staticmethod
    def kv_cache_shape(num_blocks, block_size, num_kv_heads, head_dim):
        return (2, num_blocks, block_size, num_kv_heads, head_dim)

    def forward(self, query, key, value, kv_cache, metadata: AttentionMetadata):
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        block_size = key_cache.shape[1]
        flat_k = key_cache.view(-1, self.num_kv_heads, self.head_dim)
        flat_v = value_cache.view(-1, self.num_kv_heads, self.head_dim)
        slots = metadata.slot_mapping.long()
        flat_k.index_copy_(0, slots, key.to(flat_k.dtype))
        flat_v.index_copy_(0, slots, value.to(flat_v.dtype))

        out = torch.empty_like(query)
        qlens = metadata.query_lens_host
        starts = [0]
        for n in qlens:
            starts.append(starts[-1] + n)
        decode_rows = [i for i, n in enumerate(qlens) if n == 1]
        if decode_rows:
            self._decode(query, key_cache, value_cache, metadata, decode_rows, starts, out)
        for i, n in enumerate(qlens):
            if n != 1:
                self._prefill(query, key_cache, value_cache, metadata, i, starts[i], n, out)
        return out

    def _gather(self, cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        # [..., nblocks] block ids -> [..., nblocks * block_size, kv_heads, head_dim]
        g = cache[blocks]
        return g.reshape(*blocks.shape[:-1], -1, self.num_kv_heads, self.head_dim)

    def _decode(self, query, key_cache, value_cache, md, rows, starts, out):
        block_size = key_cache.shape[1]
        lens = [md.seq_lens_host[i] for i in rows]
        nblocks = -(-max(lens) // block_size)
        row_idx = torch.tensor(rows, device=query.device)
        tok_idx = torch.tensor([starts[i] for i in rows], device=query.device)
        blocks = md.block_tables.index_select(0, row_idx)[:, :nblocks].long()
        k = self._gather(key_cache, blocks).transpose(1, 2)  # [B, kvh, L, d]
        v = self._gather(value_cache, blocks).transpose(1, 2)
        b, group = len(rows), self.num_heads // self.num_kv_heads
        q = query.index_select(0, tok_idx).view(b, self.num_kv_heads, group, self.head_dim)
        scores = torch.matmul(q.to(k.dtype), k.transpose(-1, -2)).float() * self.scale
        positions = torch.arange(k.shape[2], device=query.device)
        valid = positions[None, :] < torch.tensor(lens, device=query.device)[:, None]
        scores.masked_fill_(~valid[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        o = torch.matmul(probs, v).reshape(b, self.num_heads, self.head_dim)
        out.index_copy_(0, tok_idx, o.to(out.dtype))

    def _prefill(self, query, key_cache, value_cache, md, i, start, qlen, out):
        block_size = key_cache.shape[1]
        seq_len = md.seq_lens_host[i]
        nblocks = -(-seq_len // block_size)
        blocks = md.block_tables[i, :nblocks].long()
        k = self._gather(key_cache, blocks)[:seq_len]  # [L, kvh, d]
        v = self._gather(value_cache, blocks)[:seq_len]
        group = self.num_heads // self.num_kv_heads
        q = query[start : start + qlen].transpose(0, 1)  # [h, qlen, d]
        k = k.transpose(0, 1).repeat_interleave(group, dim=0)  # [h, L, d]
        v = v.transpose(0, 1).repeat_interleave(group, dim=0)
        context = seq_len - qlen
        q_pos = torch.arange(context, seq_len, device=query.device)
        k_pos = torch.arange(seq_len, device=query.device)
        mask = k_pos[None, :] <= q_pos[:, None]
        o = F.scaled_dot_product_attention(
            q.to(k.dtype), k, v, attn_mask=mask, scale=self.scale
        )
        out[start : start + qlen] = o.transpose(0, 1).to(out.dtype)


@hookimpl
def register_attention_backends():
    return [TorchAttentionBackend]
