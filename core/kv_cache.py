"""The paged KV-cache manager: a pool of fixed-size blocks and one block table per sequence.

K/V for token ``i`` of a sequence lives in block ``table[i // block_size]`` at offset
``i % block_size``; its *slot* is ``block * block_size + offset``.  Blocks are taken from the
pool as tokens arrive and returned the moment a sequence ends.  There is no contiguous
per-sequence buffer anywhere: the attention backend reads K/V only through block tables.

Sharing rests on reference counts: a block's count is the number of tables holding it.
- *Prefix caching*: every full block gets a key chained over the previous block's key, its
  token ids and an extra key (anything else that changes K/V).  A new sequence takes every
  leading block whose key is cached instead of computing it.  A cached block nobody holds
  stays reusable until the pool needs it, evicted least recently used first.
- *Copy-on-write*: ``fork`` gives a second table the same blocks; before a sequence writes
  into a block it shares, ``allocate_slots`` gives it a private copy (the copy itself is a
  pending block operation the engine executes on the device before the step runs).
- *Swap*: ``swap_out`` moves a sequence's blocks to a CPU swap pool, ``swap_in`` back.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np


class BlockPool:
    """Block ids ``0 .. num_blocks-1`` with reference counts, a free list, and an LRU of
    cached blocks that no table holds (free to reuse, but worth keeping)."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"num_kv_blocks: must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        # A list, not an array: it is read one element at a time on every step, and a numpy
        # scalar read costs several times a list's.
        self.ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self.block_key: dict[int, bytes] = {}  # cached blocks: block -> prefix key
        self.cached: dict[bytes, int] = {}  # prefix key -> block
        self.num_evictions = 0

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._evictable)

    def allocate(self) -> int:
        if self._free:
            block = self._free.popleft()
        else:  # reuse the least recently used cached block
            block, _ = self._evictable.popitem(last=False)
            del self.cached[self.block_key.pop(block)]
            self.num_evictions += 1
        self.ref_counts[block] = 1
        return block

    def incref(self, block: int) -> None:
        if self.ref_counts[block] == 0:  # a cached block comes back into use
            del self._evictable[block]
        self.ref_counts[block] += 1

    def decref(self, block: int) -> None:
        assert self.ref_counts[block] > 0, f"block {block} freed twice"
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            if block in self.block_key:
                self._evictable[block] = None
            else:
                self._free.append(block)

    def register(self, block: int, key: bytes) -> None:
        """Remember that ``block`` holds the full block with prefix key ``key``."""
        if key not in self.cached and block not in self.block_key:
            self.cached[key] = block
            self.block_key[block] = key


def block_key(parent: bytes | None, tokens: list[int], extra: bytes = b"") -> bytes:
    """Key of a full block: chained over its parent's key, its token ids and an extra key."""
    h = hashlib.sha256(parent or b"root")
    h.update(np.asarray(tokens, dtype=np.int64).tobytes())
    h.update(extra)
    return h.digest()


class BlockTableArray:
    """Every sequence's block table mirrored in one 2-D int32 array: a row per sequence,
    holding its blocks and zeros after them.

    The model runner gathers a step's tables from it in one numpy call; converting each
    sequence's Python list instead cost about 3.5 us a sequence, a millisecond a step at
    batch 256.  Rows change only when a table does (a new block every ``block_size`` tokens,
    a copy-on-write, a fork, a swap), and ``KVCacheManager`` is the only writer.
    """

    def __init__(self, rows: int = 16, cols: int = 64):
        self.array = np.zeros((rows, cols), dtype=np.int32)
        self.row_of: dict[str, int] = {}
        self._len: dict[str, int] = {}  # entries written in each sequence's row
        self._free_rows: list[int] = []
        self._next_row = 0

    def write(self, seq_id: str, table: list[int], start: int = 0) -> None:
        """Store ``table[start:]`` (the entries before ``start`` are already stored)."""
        row = self.row_of.get(seq_id)
        if row is None:
            row = self._free_rows.pop() if self._free_rows else self._new_row()
            self.row_of[seq_id] = row
            start = 0
        n = len(table)
        if n > self.array.shape[1]:
            grown = np.zeros((self.array.shape[0], max(n, 2 * self.array.shape[1])), np.int32)
            grown[:, : self.array.shape[1]] = self.array
            self.array = grown
        if n > start:
            self.array[row, start:n] = table[start:]
        self._len[seq_id] = n

    def drop(self, seq_id: str) -> None:
        row = self.row_of.pop(seq_id, None)
        if row is not None:
            self.array[row, : self._len.pop(seq_id)] = 0
            self._free_rows.append(row)

    def _new_row(self) -> int:
        if self._next_row == self.array.shape[0]:
            grown = np.zeros((2 * self.array.shape[0], self.array.shape[1]), np.int32)
            grown[: self.array.shape[0]] = self.array
            self.array = grown
        self._next_row += 1
        return self._next_row - 1


@dataclass
class KVCacheStats:
    kv_blocks_total: int
    kv_blocks_free: int
    kv_blocks_peak: int
    kv_slots_allocated: int
    kv_slots_used: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    prefix_cache_hit_rate: float
    swap_blocks_total: int
    swap_blocks_free: int


@dataclass
class BlockOps:
    """Block moves the engine must execute on the cache tensors before the step runs:
    swap-outs first (their sources may be reused this step), then swap-ins, then copies."""

    swap_out: list[tuple[int, int]] = field(default_factory=list)  # (device, cpu)
    swap_in: list[tuple[int, int]] = field(default_factory=list)  # (cpu, device)
    copy: list[tuple[int, int]] = field(default_factory=list)  # (device src, device dst)

    def __bool__(self) -> bool:
        return bool(self.swap_out or self.swap_in or self.copy)


class KVCacheManager:
    """Owns the block pools and the block table of every sequence that holds KV blocks."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False,
                 num_swap_blocks: int = 0):
        if block_size < 1:
            raise ValueError(f"block_size: must be >= 1, got {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self.swap_pool = BlockPool(num_swap_blocks) if num_swap_blocks > 0 else None
        self.block_tables: dict[str, list[int]] = {}
        self.table_array = BlockTableArray()  # the same tables, for the model runner
        self.swapped_tables: dict[str, list[int]] = {}  # sequence -> CPU swap blocks
        self._num_tokens: dict[str, int] = {}  # tokens each table holds slots for
        self._keys: dict[str, list[bytes]] = {}  # prefix keys of each table's full blocks
        self.pending = BlockOps()
        self.peak_blocks_used = 0
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    def _note_peak(self) -> None:
        used = self.pool.num_blocks - self.pool.num_free
        self.peak_blocks_used = max(self.peak_blocks_used, used)

    # ---- allocation ------------------------------------------------------------------------
    def _shared_from(self, table: list[int], write_from: int | None) -> list[int]:
        """Indices of ``table``'s blocks from token ``write_from`` on that another table holds
        too (a write there needs a private copy first)."""
        if write_from is None:
            return []
        refs = self.pool.ref_counts
        return [i for i in range(write_from // self.block_size, len(table)) if refs[table[i]] > 1]

    def blocks_needed(self, seq_id: str, num_tokens: int, write_from: int | None = None) -> int:
        """Blocks ``allocate_slots(seq_id, num_tokens, write_from)`` would take from the pool."""
        table = self.block_tables.get(seq_id, [])
        return max(0, -(-num_tokens // self.block_size) - len(table)) + \
            len(self._shared_from(table, write_from))

    def allocate_slots(self, seq_id: str, num_tokens: int, write_from: int | None = None) -> bool:
        """Make sure the first ``num_tokens`` tokens of ``seq_id`` have slots, and that every
        block from token ``write_from`` on is private (copy-on-write).

        All or nothing: returns False, changing nothing, when the pool has too few free blocks.
        Called for every running sequence on every step, so the common case (a decode token
        that fits in the sequence's own last block) touches nothing but this table.
        """
        table = self.block_tables.get(seq_id)
        if table is None:
            table = []
        new_blocks = -(-num_tokens // self.block_size) - len(table)
        if new_blocks <= 0 and table and write_from is not None and \
                write_from >= (len(table) - 1) * self.block_size and \
                self.pool.ref_counts[table[-1]] == 1:
            # A decode token inside the sequence's own last block: nothing to take or copy.
            if num_tokens > self._num_tokens.get(seq_id, 0):
                self._num_tokens[seq_id] = num_tokens
            return True
        shared = self._shared_from(table, write_from) if table else []
        if new_blocks > 0 or shared:
            pool = self.pool
            if max(0, new_blocks) + len(shared) > pool.num_free:
                return False
            changed_from = shared[0] if shared else len(table)  # first entry rewritten
            for i in shared:
                old = table[i]
                new = pool.allocate()
                self.pending.copy.append((old, new))
                pool.decref(old)
                table[i] = new
            for _ in range(new_blocks):
                table.append(pool.allocate())
            self._note_peak()
            self.table_array.write(seq_id, table, changed_from)
        self.block_tables[seq_id] = table
        if num_tokens > self._num_tokens.get(seq_id, 0):
            self._num_tokens[seq_id] = num_tokens
        return True

    def free(self, seq_id: str) -> None:
        """Let go of every block of ``seq_id``; shared blocks stay with their other holders.
        The tail goes first so that, of a cached prefix, its end is evicted before its start."""
        for block in reversed(self.block_tables.pop(seq_id, ())):
            self.pool.decref(block)
        self.table_array.drop(seq_id)
        for block in self.swapped_tables.pop(seq_id, ()):
            self.swap_pool.decref(block)
        self._num_tokens.pop(seq_id, None)
        self._keys.pop(seq_id, None)

    def fork(self, parent_id: str, child_id: str) -> None:
        """Give ``child_id`` the same blocks as ``parent_id`` (shared until written)."""
        table = self.block_tables[parent_id]
        for block in table:
            self.pool.incref(block)
        self.block_tables[child_id] = list(table)
        self.table_array.write(child_id, table)
        self._num_tokens[child_id] = self._num_tokens.get(parent_id, 0)
        self._keys[child_id] = list(self._keys.get(parent_id, ()))

    def num_cached_blocks(self, seq_id: str) -> int:
        """How many of ``seq_id``'s leading full blocks have prefix keys registered."""
        return len(self._keys.get(seq_id, ()))

    def slot(self, seq_id: str, position: int) -> int:
        table = self.block_tables[seq_id]
        return table[position // self.block_size] * self.block_size + position % self.block_size

    def take_pending(self) -> BlockOps:
        ops, self.pending = self.pending, BlockOps()
        return ops

    # ---- prefix caching ---------------------------------------------------------------------
    def match_prefix(self, seq_id: str, token_ids: list[int], extra: bytes = b"") -> int:
        """Give a sequence with no blocks every leading cached block of ``token_ids``; return
        the number of tokens they cover.  At least one token is always left to compute, so
        the step that finishes the prompt produces logits."""
        if not self.enable_prefix_caching or seq_id in self.block_tables:
            return 0
        table: list[int] = []
        keys: list[bytes] = []
        parent = None
        bs = self.block_size
        for i in range((len(token_ids) - 1) // bs):
            key = block_key(parent, token_ids[i * bs : (i + 1) * bs], extra)
            block = self.pool.cached.get(key)
            if block is None:
                break
            self.pool.incref(block)
            table.append(block)
            keys.append(key)
            parent = key
        if table:
            self.block_tables[seq_id] = table
            self.table_array.write(seq_id, table)
            self._keys[seq_id] = keys
            self._num_tokens[seq_id] = len(table) * bs
            self._note_peak()
        return len(table) * bs

    def record_prefix_query(self, num_tokens: int, num_hit: int) -> None:
        if self.enable_prefix_caching:
            self.prefix_cache_queries += num_tokens
            self.prefix_cache_hits += num_hit

    def cache_full_blocks(self, seq_id: str, token_ids: list[int], num_computed: int,
                          extra: bytes = b"") -> None:
        """Register every block of ``seq_id`` whose tokens are all computed."""
        if not self.enable_prefix_caching:
            return
        table = self.block_tables.get(seq_id)
        if table is None:
            return
        keys = self._keys.setdefault(seq_id, [])
        bs = self.block_size
        for i in range(len(keys), min(num_computed // bs, len(table))):
            key = block_key(keys[-1] if keys else None, token_ids[i * bs : (i + 1) * bs], extra)
            keys.append(key)
            self.pool.register(table[i], key)

    # ---- swapping ---------------------------------------------------------------------------
    def swap_out(self, seq_id: str) -> bool:
        """Move ``seq_id``'s blocks to the CPU swap pool; False (nothing done) if it is full."""
        table = self.block_tables.get(seq_id, [])
        if self.swap_pool is None or self.swap_pool.num_free < len(table):
            return False
        cpu = []
        for block in table:
            c = self.swap_pool.allocate()
            self.pending.swap_out.append((block, c))
            cpu.append(c)
        for block in reversed(table):
            self.pool.decref(block)
        del self.block_tables[seq_id]
        self.table_array.drop(seq_id)
        self.swapped_tables[seq_id] = cpu
        self._keys.pop(seq_id, None)  # the blocks come back elsewhere; cached again if full
        return True

    def can_swap_in(self, seq_id: str, extra_tokens: int = 0) -> bool:
        n = len(self.swapped_tables[seq_id])
        need = max(n, -(-(self._num_tokens.get(seq_id, 0) + extra_tokens) // self.block_size))
        return need <= self.pool.num_free

    def swap_in(self, seq_id: str) -> bool:
        cpu = self.swapped_tables.get(seq_id)
        if cpu is None or len(cpu) > self.pool.num_free:
            return False
        table = []
        for c in cpu:
            block = self.pool.allocate()
            self.pending.swap_in.append((c, block))
            table.append(block)
            self.swap_pool.decref(c)
        del self.swapped_tables[seq_id]
        self.block_tables[seq_id] = table
        self.table_array.write(seq_id, table)
        self._note_peak()
        return True

    def stats(self) -> KVCacheStats:
        allocated = sum(len(t) for t in self.block_tables.values()) * self.block_size
        used = sum(n for s, n in self._num_tokens.items() if s in self.block_tables)
        q, h = self.prefix_cache_queries, self.prefix_cache_hits
        return KVCacheStats(
            kv_blocks_total=self.pool.num_blocks,
            kv_blocks_free=self.pool.num_free,
            kv_blocks_peak=self.peak_blocks_used,
            kv_slots_allocated=allocated,
            kv_slots_used=used,
            prefix_cache_queries=q,
            prefix_cache_hits=h,
            prefix_cache_hit_rate=h / q if q else 0.0,
            swap_blocks_total=self.swap_pool.num_blocks if self.swap_pool else 0,
            swap_blocks_free=self.swap_pool.num_free if self.swap_pool else 0,
        )
