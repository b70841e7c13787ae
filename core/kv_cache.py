"""The paged KV-cache manager: a pool of fixed-size blocks and one block table per sequence.

K/V for token ``i`` of a sequence lives in block ``table[i // block_size]`` at offset
``i % block_size``; its *slot* is ``block * block_size + offset``.  Blocks are taken from the
pool as tokens arrive and returned the moment a sequence ends.  Reference counts let several
tables hold one block (the mechanism sharing is built on); a block is free when its count
is zero.  There is no contiguous per-sequence buffer anywhere: the attention backend reads
K/V only through block tables and slot mappings.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np


class BlockPool:
    """Fixed-size block ids ``0 .. num_blocks-1`` with reference counts and a free list."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"num_kv_blocks: must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_counts = np.zeros(num_blocks, dtype=np.int32)
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        block = self._free.popleft()
        self.ref_counts[block] = 1
        return block

    def incref(self, block: int) -> None:
        assert self.ref_counts[block] > 0, f"block {block} is free"
        self.ref_counts[block] += 1

    def decref(self, block: int) -> None:
        assert self.ref_counts[block] > 0, f"block {block} freed twice"
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self._free.append(block)


@dataclass
class KVCacheStats:
    kv_blocks_total: int
    kv_blocks_free: int
    kv_blocks_peak: int
    kv_slots_allocated: int
    kv_slots_used: int


class KVCacheManager:
    """Owns the block pool and the block table of every sequence that holds KV blocks."""

    def __init__(self, num_blocks: int, block_size: int):
        if block_size < 1:
            raise ValueError(f"block_size: must be >= 1, got {block_size}")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.block_tables: dict[str, list[int]] = {}
        self._num_tokens: dict[str, int] = {}  # tokens each table has slots reserved for
        self.peak_blocks_used = 0

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    def blocks_needed(self, seq_id: str, num_tokens: int) -> int:
        """New blocks ``seq_id`` needs so that ``num_tokens`` tokens in all have slots."""
        have = len(self.block_tables.get(seq_id, ()))
        return max(0, -(-num_tokens // self.block_size) - have)

    def allocate_slots(self, seq_id: str, num_tokens: int) -> bool:
        """Make sure the first ``num_tokens`` tokens of ``seq_id`` have slots.

        All or nothing: returns False, changing nothing, when the pool has too few free blocks.
        """
        need = self.blocks_needed(seq_id, num_tokens)
        if need > self.pool.num_free:
            return False
        table = self.block_tables.setdefault(seq_id, [])
        for _ in range(need):
            table.append(self.pool.allocate())
        self._num_tokens[seq_id] = max(self._num_tokens.get(seq_id, 0), num_tokens)
        used = self.pool.num_blocks - self.pool.num_free
        self.peak_blocks_used = max(self.peak_blocks_used, used)
        return True

    def free(self, seq_id: str) -> None:
        """Return every block of ``seq_id`` (a shared block only when its last holder lets go)."""
        for block in self.block_tables.pop(seq_id, ()):
            self.pool.decref(block)
        self._num_tokens.pop(seq_id, None)

    def slot(self, seq_id: str, position: int) -> int:
        table = self.block_tables[seq_id]
        return table[position // self.block_size] * self.block_size + position % self.block_size

    def stats(self) -> KVCacheStats:
        allocated = sum(len(t) for t in self.block_tables.values()) * self.block_size
        return KVCacheStats(
            kv_blocks_total=self.pool.num_blocks,
            kv_blocks_free=self.pool.num_free,
            kv_blocks_peak=self.peak_blocks_used,
            kv_slots_allocated=allocated,
            kv_slots_used=sum(self._num_tokens.values()),
        )
