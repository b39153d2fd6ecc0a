"""CachedStore: serves repeated gets from memory, never serves a prefix after a change to it,
stays within its byte budget (cross-process invalidation through Redis: test_redis_store.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from prefix_registry.artifact import PrefixArtifact
from prefix_registry.cache import CachedStore
from prefix_registry.errors import PrefixNotFoundError
from prefix_registry.local_store import LocalStore
from tests.registry.conftest import MakeArtifact


@pytest.fixture
async def local(tmp_path: Path) -> LocalStore:
    store = LocalStore(tmp_path / "registry")
    await store.create_tenant("acme")
    return store


async def test_hits_and_invalidation_by_name(local: LocalStore, make_artifact: MakeArtifact
                                             ) -> None:
    cache = CachedStore(local)
    await cache.start()
    await local.put(make_artifact(name="a", seed=1))
    await local.put(make_artifact(name="b", seed=2))
    a = await cache.get("acme", "a")
    assert await cache.get("acme", "a") is a  # served from memory
    await cache.get("acme", "a@1")
    await cache.get("acme", "b")
    assert len(cache) == 3
    newer = await local.put(make_artifact(name="a", seed=3))  # drops a and a@1, keeps b
    assert len(cache) == 1
    assert (await cache.get("acme", "a")).meta.sha256 == newer.sha256
    await local.delete("acme", "b")
    with pytest.raises(PrefixNotFoundError):
        await cache.get("acme", "b")
    cache.clear()
    assert len(cache) == 0
    await cache.close()


async def test_not_cached_without_a_subscription(local: LocalStore,
                                                 make_artifact: MakeArtifact) -> None:
    cache = CachedStore(local)  # not started: it would never hear of changes
    await local.put(make_artifact())
    await cache.get("acme", "style")
    assert len(cache) == 0


async def test_byte_budget_evicts_least_recently_used(local: LocalStore,
                                                      make_artifact: MakeArtifact) -> None:
    one = make_artifact().meta.size_bytes
    cache = CachedStore(local, max_bytes=2 * one)
    await cache.start()
    for name in ("a", "b", "c"):
        await local.put(make_artifact(name=name))
    await cache.get("acme", "a")
    await cache.get("acme", "b")
    await cache.get("acme", "a")  # a is now the most recent
    await cache.get("acme", "c")  # evicts b
    assert len(cache) == 2
    assert ("acme", "a") in cache and ("acme", "c") in cache and ("acme", "b") not in cache
    await cache.close()


async def test_a_fetch_racing_an_invalidation_is_not_cached(
    local: LocalStore, make_artifact: MakeArtifact
) -> None:
    await local.put(make_artifact())
    cache = CachedStore(local)
    await cache.start()
    started, release = asyncio.Event(), asyncio.Event()
    real_get = local.get

    async def slow_get(tenant: str, ref: str) -> PrefixArtifact:
        artifact = await real_get(tenant, ref)  # the old version...
        started.set()
        await release.wait()  # ...returned only after a newer one was stored
        return artifact

    local.get = slow_get  # type: ignore[method-assign]
    fetch = asyncio.create_task(cache.get("acme", "style"))
    await started.wait()
    await local.put(make_artifact(seed=5))
    release.set()
    assert (await fetch).meta.version == 1
    assert len(cache) == 0  # the stale result was not kept
    await cache.close()



async def test_concurrent_misses_share_one_fetch(local: LocalStore,
                                                 make_artifact: MakeArtifact) -> None:
    await local.put(make_artifact())
    fetches = []
    real_get = local.get

    async def counted(tenant: str, ref: str) -> PrefixArtifact:
        fetches.append((tenant, ref))
        return await real_get(tenant, ref)

    local.get = counted  # type: ignore[method-assign]  # count the store's reads
    cache = CachedStore(local)
    await cache.start()
    found = await asyncio.gather(*(cache.get("acme", "style") for _ in range(50)))
    assert len(fetches) == 1 and all(a is found[0] for a in found)
