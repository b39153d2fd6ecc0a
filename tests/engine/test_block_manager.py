"""Block accounting: own blocks grow on demand, prefix blocks are shared and cached (LRU)."""

from __future__ import annotations

from server.engine.block_manager import BlockManager, PrefixKey


def test_blocks_are_handed_out_lowest_first_and_come_back() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.grow("a", 5) and bm.table("a") == (0, 1)
    assert bm.grow("a", 8) and bm.table("a") == (0, 1)  # 8 slots still fit two blocks
    assert bm.grow("a", 9) and bm.table("a") == (0, 1, 2)
    assert bm.high_water == 3
    assert bm.grow("b", 4) and bm.table("b") == (3,)
    bm.free("a")
    assert bm.table("a") == () and bm.num_free == 7
    assert bm.grow("b", 12) and bm.table("b") == (3, 0, 1)  # freed ids are reused first
    assert bm.high_water == 4


def test_growth_fails_whole() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    assert not bm.grow("a", 9) and bm.table("a") == ()  # 5 blocks: more than the pool
    assert bm.grow("a", 8) and bm.held("a") == 4


def test_a_prefix_is_stored_once_and_shared() -> None:
    bm = BlockManager(num_blocks=10, block_size=4)
    key = PrefixKey("kv", "abc", 6)
    first = bm.acquire_prefix(key)
    assert first is not None and first.blocks == [0, 1] and not first.written
    first.written = True
    second = bm.acquire_prefix(key)
    assert second is first and first.holders == 2
    stats = bm.stats()
    assert (stats.prefix, stats.used, stats.prefix_hits, stats.prefix_misses) == (2, 2, 1, 1)
    assert bm.prefix_cost(key) == 0 and bm.prefix_cost(PrefixKey("kv", "other", 20)) == 5


def test_an_idle_prefix_stays_cached_until_its_blocks_are_needed() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    old, new = PrefixKey("kv", "old", 8), PrefixKey("kv", "new", 4)
    entry = bm.acquire_prefix(old)
    assert entry is not None
    entry.written = True
    bm.release_prefix(entry)
    assert bm.stats().idle_prefix == 2 and bm.num_free == 4  # cached, yet reclaimable
    again = bm.acquire_prefix(old)
    assert again is entry and bm.stats().prefix_hits == 1  # served from the cache
    bm.release_prefix(entry)
    newer = bm.acquire_prefix(new)
    assert newer is not None
    newer.written = True
    assert bm.grow("r", 12)  # needs 3 blocks: only 1 is free, so the idle "old" goes
    assert bm.stats().prefix_evictions == 1 and bm.acquire_prefix(old) is None
    assert bm.stats().prefix_entries == 1  # "new" is held: never evicted


def test_a_held_prefix_is_never_evicted() -> None:
    bm = BlockManager(num_blocks=3, block_size=4)
    entry = bm.acquire_prefix(PrefixKey("kv", "p", 8))
    assert entry is not None
    entry.written = True
    assert not bm.grow("r", 8)  # only one block is free; the held prefix stays
    assert bm.stats().prefix_entries == 1


def test_a_prefix_never_written_is_dropped_with_its_last_holder() -> None:
    bm = BlockManager(num_blocks=3, block_size=4)
    entry = bm.acquire_prefix(PrefixKey("kv", "bad", 4))
    assert entry is not None
    bm.release_prefix(entry)
    assert bm.num_free == 3 and bm.stats().prefix_entries == 0
