"""Block pool and block tables: property-based checks of the bookkeeping."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedllm.kv_cache import BlockPool, KVCacheManager


def check_table_array(kv: KVCacheManager) -> None:
    """The array the model runner reads mirrors every block table, zeros after its blocks,
    and holds rows for live tables only."""
    arr = kv.table_array
    assert set(arr.row_of) == {s for s, t in kv.block_tables.items() if t}
    assert len(set(arr.row_of.values())) == len(arr.row_of)  # no row shared
    for seq, table in kv.block_tables.items():
        if table:
            row = arr.array[arr.row_of[seq]]
            assert list(row[: len(table)]) == table and not row[len(table):].any()
    for r in set(range(arr._next_row)) - set(arr.row_of.values()):  # released rows are zero
        assert not arr.array[r].any()


def check_invariants(kv: KVCacheManager) -> None:
    check_table_array(kv)
    holders = [0] * kv.num_blocks
    for table in kv.block_tables.values():
        for b in table:
            holders[b] += 1
    assert list(kv.pool.ref_counts) == holders  # every count equals the tables holding it
    used = sum(1 for h in holders if h)
    assert used + kv.num_free_blocks == kv.num_blocks  # blocks are conserved
    assert len(set(kv.pool._free)) == kv.num_free_blocks  # no block free twice


ops = st.lists(
    st.tuples(st.sampled_from(["grow", "free"]), st.integers(0, 5), st.integers(1, 40)),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(num_blocks=st.integers(1, 24), block_size=st.sampled_from([1, 4, 16]), ops=ops)
def test_random_allocate_and_free_keep_counts_and_conserve_blocks(num_blocks, block_size, ops):
    kv = KVCacheManager(num_blocks, block_size)
    lengths: dict[str, int] = {}
    for op, seq, amount in ops:
        sid = f"s{seq}"
        if op == "grow":
            target = lengths.get(sid, 0) + amount
            before_free = kv.num_free_blocks
            before_table = list(kv.block_tables.get(sid, []))
            need = kv.blocks_needed(sid, target)
            ok = kv.allocate_slots(sid, target)
            if ok:
                lengths[sid] = target
                assert len(kv.block_tables[sid]) * block_size >= target
                assert kv.num_free_blocks == before_free - need
            else:  # all or nothing
                assert need > before_free
                assert kv.num_free_blocks == before_free
                assert kv.block_tables.get(sid, []) == before_table
        else:
            kv.free(sid)
            lengths.pop(sid, None)
            assert sid not in kv.block_tables
        check_invariants(kv)
    for sid in list(kv.block_tables):
        kv.free(sid)
    assert kv.num_free_blocks == num_blocks


def test_slots_follow_the_block_table():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    assert kv.allocate_slots("a", 3)
    assert kv.allocate_slots("b", 5)
    assert kv.allocate_slots("a", 9)
    table = kv.block_tables["a"]
    assert len(table) == 3 and len(set(table)) == 3
    for pos in range(9):
        assert kv.slot("a", pos) == table[pos // 4] * 4 + pos % 4
    assert not set(table) & set(kv.block_tables["b"])


def test_shared_block_is_freed_only_by_its_last_holder():
    pool = BlockPool(2)
    b = pool.allocate()
    pool.incref(b)
    pool.decref(b)
    assert pool.num_free == 1
    pool.decref(b)
    assert pool.num_free == 2
    with pytest.raises(AssertionError):
        pool.decref(b)


def test_stats_peak_and_waste():
    kv = KVCacheManager(num_blocks=10, block_size=16)
    kv.allocate_slots("a", 17)
    kv.allocate_slots("b", 1)
    s = kv.stats()
    assert (s.kv_blocks_total, s.kv_blocks_free, s.kv_blocks_peak) == (10, 7, 3)
    assert (s.kv_slots_allocated, s.kv_slots_used) == (48, 18)
    kv.free("a")
    kv.free("b")
    assert kv.stats().kv_blocks_free == 10 and kv.stats().kv_blocks_peak == 3


@pytest.mark.parametrize("field,kwargs", [("num_kv_blocks", dict(num_blocks=0, block_size=16)),
                                          ("block_size", dict(num_blocks=4, block_size=0))])
def test_bad_sizes_name_the_field(field, kwargs):
    with pytest.raises(ValueError, match=field):
        KVCacheManager(**kwargs)


# ---- sharing: fork, copy-on-write, prefix cache, swap -----------------------------------------
def check_all_invariants(kv: KVCacheManager) -> None:
    check_table_array(kv)
    pool = kv.pool
    holders = [0] * kv.num_blocks
    for table in kv.block_tables.values():
        for b in table:
            holders[b] += 1
    assert list(pool.ref_counts) == holders
    free = set(pool._free)
    evictable = set(pool._evictable)
    assert len(free) == len(pool._free) and not free & evictable
    for b in range(kv.num_blocks):  # every block is exactly one of: held, free, cached-idle
        assert (holders[b] > 0) + (b in free) + (b in evictable) == 1
    assert all(b in pool.block_key for b in evictable)  # idle blocks stay only when cached
    assert all(pool.cached[key] == b for b, key in pool.block_key.items())
    if kv.swap_pool is not None:
        swap_holders = [0] * kv.swap_pool.num_blocks
        for table in kv.swapped_tables.values():
            for b in table:
                swap_holders[b] += 1
        assert list(kv.swap_pool.ref_counts) == swap_holders
        assert kv.swap_pool.num_free + sum(swap_holders) == kv.swap_pool.num_blocks
    assert not set(kv.block_tables) & set(kv.swapped_tables)


sharing_ops = st.lists(
    st.tuples(st.sampled_from(["admit", "append", "fork", "free", "swap_out", "swap_in"]),
              st.integers(0, 5), st.integers(0, 5), st.integers(1, 9)),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(num_blocks=st.integers(2, 20), ops=sharing_ops, vocab=st.integers(1, 3))
def test_random_sharing_operations_keep_counts_exact(num_blocks, ops, vocab):
    """Random interleavings of admit (with prefix-cache hits), append (with copy-on-write),
    fork, free, swap out and swap in: reference counts always equal the number of tables
    holding each block, and no block is lost."""
    bs = 2
    kv = KVCacheManager(num_blocks, bs, enable_prefix_caching=True, num_swap_blocks=6)
    tokens: dict[str, list[int]] = {}  # token ids of every live sequence
    computed: dict[str, int] = {}
    for op, a, b, n in ops:
        sa, sb = f"s{a}", f"s{b}"
        if op == "admit" and sa not in tokens:
            toks = [(a * 7 + i) % vocab for i in range(n)]  # small vocab: many cache hits
            hit = kv.match_prefix(sa, toks)
            assert hit % bs == 0 and hit < len(toks)
            if kv.allocate_slots(sa, len(toks), write_from=hit):
                tokens[sa], computed[sa] = toks, len(toks)
                kv.cache_full_blocks(sa, toks, len(toks))
            else:
                kv.free(sa)
        elif op == "append" and sa in kv.block_tables:
            new = tokens[sa] + [n % vocab]
            before = {blk: kv.pool.ref_counts[blk] for blk in kv.block_tables[sa]}
            if kv.allocate_slots(sa, len(new), write_from=computed[sa]):
                # the block being written is private now
                pos_block = kv.block_tables[sa][computed[sa] // bs]
                assert kv.pool.ref_counts[pos_block] == 1
                tokens[sa], computed[sa] = new, len(new)
                kv.cache_full_blocks(sa, new, len(new))
            else:
                assert {blk: kv.pool.ref_counts[blk] for blk in kv.block_tables[sa]} == before
        elif op == "fork" and sa in kv.block_tables and sb not in tokens:
            kv.fork(sa, sb)
            tokens[sb], computed[sb] = list(tokens[sa]), computed[sa]
            assert kv.block_tables[sb] == kv.block_tables[sa]
        elif op == "free" and sa in tokens:
            kv.free(sa)
            tokens.pop(sa)
            computed.pop(sa)
        elif op == "swap_out" and sa in kv.block_tables:
            n_blocks = len(kv.block_tables[sa])
            if kv.swap_out(sa):
                assert len(kv.swapped_tables[sa]) == n_blocks
        elif op == "swap_in" and sa in kv.swapped_tables:
            kv.swap_in(sa)
        check_all_invariants(kv)
    kv.take_pending()
    for sid in list(tokens):
        kv.free(sid)
    check_all_invariants(kv)
    assert kv.num_free_blocks == num_blocks
    assert kv.swap_pool.num_free == 6


def test_copy_on_write_copies_only_the_written_shared_block():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    assert kv.allocate_slots("p", 10)  # blocks 0,1 full; 2 partial
    kv.fork("p", "c")
    assert kv.allocate_slots("c", 11, write_from=10)
    ops = kv.take_pending()
    p, c = kv.block_tables["p"], kv.block_tables["c"]
    assert p[:2] == c[:2] and p[2] != c[2]
    assert ops.copy == [(p[2], c[2])]
    assert kv.allocate_slots("p", 11, write_from=10)  # now private: no second copy
    assert not kv.take_pending().copy


def test_prefix_keys_chain_over_previous_blocks():
    kv = KVCacheManager(num_blocks=10, block_size=2, enable_prefix_caching=True)
    kv.allocate_slots("a", 5)
    kv.cache_full_blocks("a", [1, 2, 3, 4, 5], 5)
    kv.free("a")
    assert kv.match_prefix("b", [1, 2, 3, 4, 9]) == 4
    assert kv.match_prefix("c", [9, 9, 3, 4, 5]) == 0  # same block, different history
    assert kv.match_prefix("d", [1, 2, 3, 4]) == 2  # one token is always left to compute
