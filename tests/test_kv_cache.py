"""Block pool and block tables: property-based checks of the bookkeeping."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedllm.kv_cache import BlockPool, KVCacheManager


def check_invariants(kv: KVCacheManager) -> None:
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
