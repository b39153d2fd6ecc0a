"""The prefix K/V cache: computed once per content, LRU by bytes, pinned entries stay."""

from __future__ import annotations

import torch

from server.engine.prefix_cache import PrefixCache
from server.engine.request import PrefixSource


def _source(content: str, length: int = 4) -> PrefixSource:
    return PrefixSource(content, "p", 1, "kv", length, {})


def _kv(length: int = 4):  # keys + values: 2 * (2*2*4*4) float32 = 512 bytes for length 4
    return lambda: (torch.ones(2, 2, length, 4), torch.ones(2, 2, length, 4))


def test_hits_misses_and_content_hash_keying() -> None:
    cache = PrefixCache(budget_bytes=2000)
    calls = []

    def compute():
        calls.append(1)
        return _kv()()

    cache.acquire(_source("h1"), compute)
    cache.acquire(_source("h1"), compute)
    cache.acquire(_source("h2"), compute)  # same name, new content: never the old K/V
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.entries, stats.bytes) == (1, 2, 2, 1024)
    assert len(calls) == 2


def test_lru_eviction_by_bytes_never_takes_pinned_entries() -> None:
    cache = PrefixCache(budget_bytes=1100)  # room for two 512-byte entries
    a, b, c = _source("a"), _source("b"), _source("c")
    assert cache.acquire(a, _kv())[2]
    assert cache.acquire(b, _kv())[2]
    cache.release(b)
    assert cache.acquire(c, _kv())[2]  # b is the only unpinned entry: evicted, a stays
    stats = cache.stats()
    assert (stats.evictions, stats.entries, stats.bytes) == (1, 2, 1024)
    # Everything pinned: a new prefix is served but not kept, nothing is evicted.
    keys, _, pinned = cache.acquire(_source("d"), _kv())
    assert keys.shape == (2, 2, 4, 4) and not pinned
    assert cache.stats().evictions == 1 and cache.stats().bytes == 1024
    cache.acquire(a, _kv())  # a hit, still there
    assert cache.stats().hits == 1


def test_a_prefix_bigger_than_the_budget_is_used_once_not_kept() -> None:
    cache = PrefixCache(budget_bytes=100)
    _, _, pinned = cache.acquire(_source("big"), _kv())
    assert not pinned and cache.stats().entries == 0
