"""The quota cache over a real store (local directory; a private Redis that is killed) and the
tokens-per-minute buckets, both on a controlled clock."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from prefix_registry.errors import RegistryUnavailableError, TenantNotFoundError
from prefix_registry.local_store import LocalStore
from prefix_registry.quotas import TenantQuota
from prefix_registry.redis_store import RedisStore
from server.api.quotas import Quota, QuotaCache
from tests.redis_procs import free_port


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def counting(store: Any) -> list[str]:
    """Count `store.get_quota` calls (the store still answers them)."""
    reads: list[str] = []
    real = store.get_quota

    async def get_quota(tenant: str) -> TenantQuota:
        reads.append(tenant)
        await asyncio.sleep(0.01)  # let concurrent callers pile up
        return await real(tenant)  # type: ignore[no-any-return]

    store.get_quota = get_quota
    return reads


async def test_a_quota_is_read_once_per_ttl_and_shared(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    await store.create_tenant("acme")
    await store.update_quota("acme", {"weight": 2, "max_queued": 9})
    clock, reads = Clock(), counting(store)
    cache = QuotaCache(store, Quota(max_running=4), ttl_s=5.0, clock=clock)
    quotas = await asyncio.gather(*(cache.get("acme") for _ in range(20)))
    assert quotas == [Quota(weight=2.0, max_running=4, max_queued=9)] * 20 and reads == ["acme"]
    clock.now += 4.9
    await cache.get("acme")
    assert len(reads) == 1
    await store.update_quota("acme", {"weight": 3})  # elsewhere: seen after the TTL
    clock.now += 0.2
    assert (await cache.get("acme")).weight == 3.0 and len(reads) == 2
    cache.remember("acme", TenantQuota(weight=7))  # written through this server: at once
    assert (await cache.get("acme")).weight == 7.0 and len(reads) == 2
    assert "acme" in cache and "ghost" not in cache
    with pytest.raises(TenantNotFoundError):
        await cache.get("ghost")
    assert "ghost" not in cache


async def test_an_announced_change_is_read_again_and_a_racing_read_is_not_trusted(
    tmp_path: Path
) -> None:
    store = LocalStore(tmp_path)
    await store.create_tenant("acme")
    clock, reads = Clock(), counting(store)
    cache = QuotaCache(store, Quota(), ttl_s=3600.0, clock=clock)
    await store.subscribe(on_quota=cache.expire)
    assert (await cache.get("acme")).weight == 1.0
    await store.update_quota("acme", {"weight": 2})  # announced: expired, still a known tenant
    assert "acme" in cache
    assert (await cache.get("acme")).weight == 2.0 and len(reads) == 2
    # A read in flight when a change is announced may have missed it: used once, then read again.
    cache.expire("acme")
    racing = asyncio.ensure_future(cache.get("acme"))
    await asyncio.sleep(0.001)
    assert len(reads) == 3  # in flight
    cache.expire("acme")  # announced meanwhile
    assert (await racing).weight == 2.0
    await cache.get("acme")
    assert len(reads) == 4
    await cache.get("acme")
    assert len(reads) == 4  # that one is trusted


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 30
    while True:
        try:
            redis.Redis.from_url(url, socket_timeout=1).ping()
            break
        except redis.RedisError:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
    try:
        yield url, process
    finally:
        process.kill()
        process.wait()


async def test_the_last_quota_is_used_while_the_registry_is_down(
    private_redis: tuple[str, subprocess.Popen[bytes]]
) -> None:
    url, process = private_redis
    store = RedisStore(url, namespace="quota-cache:")
    try:
        await store.create_tenant("acme")
        await store.create_tenant("beta")
        await store.update_quota("acme", {"tokens_per_minute": 100})
        clock = Clock()
        cache = QuotaCache(store, Quota(), ttl_s=1.0, clock=clock)
        assert (await cache.get("acme")).tokens_per_minute == 100
        process.kill()
        process.wait()
        clock.now += 10  # expired: the registry is asked, fails, the last quota is used
        assert (await cache.get("acme")).tokens_per_minute == 100
        with pytest.raises(RegistryUnavailableError):
            await cache.get("beta")  # never read: nothing to fall back on here
    finally:
        await store.close()
