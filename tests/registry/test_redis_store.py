"""What only the Redis store does: cross-process invalidation over pub/sub, failing fast when
Redis is down, reconnecting by itself after a restart, and its key layout."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import redis
import safetensors

from prefix_registry.artifact import PrefixArtifact
from prefix_registry.cache import CachedStore
from prefix_registry.errors import RegistryUnavailableError, TenantNotFoundError
from prefix_registry.redis_store import RedisOptions, RedisStore
from tests.registry.conftest import MakeArtifact, closed_port
from tests.registry.test_store_contract import _until


@pytest.fixture
async def other_store(redis_url: str, namespace: str) -> AsyncIterator[RedisStore]:
    """A second store on the same namespace: another server process, as far as Redis knows."""
    store = RedisStore(redis_url, namespace=namespace)
    yield store
    await store.close()


async def test_update_on_one_process_reaches_the_other_within_1s(
    redis_store: RedisStore, other_store: RedisStore, make_artifact: MakeArtifact
) -> None:
    heard: list[tuple[str, str]] = []
    await redis_store.subscribe(lambda t, n: heard.append((t, n)))
    await other_store.create_tenant("acme")
    await other_store.put(make_artifact())
    await _until(lambda: ("acme", "style") in heard, timeout=1.0)
    heard.clear()
    await other_store.delete("acme", "style")
    await _until(lambda: ("acme", "style") in heard, timeout=1.0)


async def test_a_quota_change_on_one_process_is_announced_to_the_other(
    redis_store: RedisStore, other_store: RedisStore
) -> None:
    heard: list[str] = []
    await redis_store.subscribe(lambda t, n: None, on_quota=heard.append)
    await other_store.create_tenant("acme")
    await other_store.update_quota("acme", {"weight": 2})
    await _until(lambda: heard == ["acme"], timeout=1.0)
    with pytest.raises(TenantNotFoundError):
        await other_store.update_quota("ghost", {"weight": 2})
    await asyncio.sleep(0.2)
    assert heard == ["acme"]  # nothing changed, nothing announced


async def test_cached_store_drops_a_stale_prefix_updated_elsewhere(
    redis_store: RedisStore, other_store: RedisStore, make_artifact: MakeArtifact
) -> None:
    cache = CachedStore(redis_store)
    await cache.start()
    heard: list[tuple[str, str]] = []  # called after the cache's own callback, for the same message
    await redis_store.subscribe(lambda t, n: heard.append((t, n)))
    await other_store.create_tenant("acme")
    first = await other_store.put(make_artifact(seed=1))
    # The announcement of this put must reach the cache before it caches anything, or it would
    # drop what it had just cached when it arrives.
    await _until(lambda: ("acme", "style") in heard, timeout=1.0)
    assert (await cache.get("acme", "style")).meta.sha256 == first.sha256
    assert (await cache.get("acme", "style@1")).meta.sha256 == first.sha256
    assert len(cache) == 2
    second = await other_store.put(make_artifact(seed=2))
    await _until(lambda: len(cache) == 0, timeout=1.0)
    assert (await cache.get("acme", "style")).meta.sha256 == second.sha256
    await other_store.delete("acme", "style", version=2)
    await _until(lambda: len(cache) == 0, timeout=1.0)
    assert (await cache.get("acme", "style")).meta.version == 1
    await cache.close()


async def test_put_many_and_clear_namespace(
    redis_store: RedisStore, redis_url: str, namespace: str, make_artifact: MakeArtifact
) -> None:
    await redis_store.create_tenant("acme")
    artifacts = [make_artifact(name=f"n{i % 40:02d}", seed=i) for i in range(120)]
    metas = await redis_store.put_many(artifacts, chunk=50)
    assert [m.version for m in metas] == [i // 40 + 1 for i in range(120)]
    page = await redis_store.list("acme", limit=1000)
    assert len(page.items) == 40 and {m.version for m in page.items} == {3}
    got = await redis_store.get("acme", "n07@2")
    assert got.meta.sha256 == artifacts[47].meta.sha256
    other = RedisStore(redis_url, namespace=namespace + "x:")
    assert await other.clear_namespace() == 0  # another namespace: none of our keys match
    await other.close()
    # tenants + names index + stored bytes, seq + versions per name, meta + blob per version
    assert await redis_store.clear_namespace() == 3 + 40 * 2 + 120 * 2
    assert not await redis_store.tenant_exists("acme")


async def test_keys_follow_the_documented_layout(
    redis_store: RedisStore, redis_url: str, namespace: str, make_artifact: MakeArtifact
) -> None:
    await redis_store.create_tenant("acme")
    await redis_store.add_key("acme", "k1", "a" * 64, 1.0)
    await redis_store.put(make_artifact())
    await redis_store.update_quota("acme", {"weight": 2})
    client = redis.Redis.from_url(redis_url)
    keys = {k.decode().removeprefix(namespace) for k in client.scan_iter(match=f"{namespace}*")}
    assert keys == {  # hash tags: tenants and keys in one slot, each tenant's prefixes in one
        "{registry}:tenants", "{registry}:key-hashes", "{registry}:t:acme:keys",
        "{registry}:t:acme:quota",
        "{t:acme}:names", "{t:acme}:p:style:seq", "{t:acme}:p:style:versions",
        "{t:acme}:p:style:1:meta", "{t:acme}:p:style:1:blob", "{t:acme}:stored-bytes",
    }
    blob = client.get(f"{namespace}{{t:acme}}:p:style:1:blob")
    assert isinstance(blob, bytes)
    # the stored bytes are a plain safetensors file, readable by safetensors itself
    assert {name for name, _ in safetensors.deserialize(blob)} == {"keys", "values"}
    assert PrefixArtifact.from_bytes(blob).meta.version == 1
    client.close()


async def test_unreachable_redis_fails_fast_with_a_clear_error() -> None:
    store = RedisStore(f"redis://127.0.0.1:{closed_port()}/0", namespace="x:")
    calls = [store.ping(), store.get("acme", "style"), store.list("acme"),
             store.create_tenant("acme"), store.tenant_for_key_hash("a" * 64)]
    for call in calls:
        with pytest.raises(RegistryUnavailableError, match="unavailable"):
            await asyncio.wait_for(call, timeout=10)  # a guard against hanging, not a benchmark
    await store.close()


async def test_redis_that_never_answers_times_out_with_a_clear_error() -> None:
    """A server that accepts the connection but never replies (a hung Redis)."""
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    options = RedisOptions(socket_timeout_s=0.5, connect_timeout_s=0.5)
    store = RedisStore(f"redis://127.0.0.1:{port}/0", namespace="x:", options=options)
    with pytest.raises(RegistryUnavailableError, match="Timeout"):
        await asyncio.wait_for(store.get_meta("acme", "style"), timeout=15)
    await store.close()
    server.close()


class PrivateRedis:
    """A throwaway redis-server of our own, so the test may stop and restart it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return
            time.sleep(0.05)
        raise RuntimeError("private redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server binary not found; can't run a private Redis to restart")
    server = PrivateRedis(closed_port())
    server.start()
    yield server
    server.stop()


async def test_listener_and_client_reconnect_after_a_redis_restart(
    private_redis: PrivateRedis, make_artifact: MakeArtifact
) -> None:
    a = RedisStore(private_redis.url, namespace="t:")
    b = RedisStore(private_redis.url, namespace="t:")
    heard: list[tuple[str, str]] = []
    resets: list[int] = []
    await a.subscribe(lambda t, n: heard.append((t, n)), on_reset=lambda: resets.append(1))
    await b.create_tenant("acme")
    await b.put(make_artifact())
    await _until(lambda: bool(heard), timeout=1.0)
    private_redis.stop()
    with pytest.raises(RegistryUnavailableError):
        await b.get("acme", "style")
    private_redis.start()  # an empty Redis: nothing was persisted
    await _until(lambda: bool(resets), timeout=10.0)  # resubscribed, told caches to drop all
    heard.clear()
    await b.create_tenant("acme")  # b's pool reconnects by itself
    await b.put(make_artifact())
    await _until(lambda: ("acme", "style") in heard, timeout=1.0)
    await a.close()
    await b.close()


async def test_stored_bytes_are_recounted_when_the_counter_is_missing(
    redis_store: RedisStore, redis_url: str, make_artifact: MakeArtifact
) -> None:
    """Data written before the counter existed (or a lost counter) is counted from the versions'
    metadata, once, by the next put or usage read."""
    await redis_store.create_tenant("acme")
    metas = [await redis_store.put(make_artifact(name=n, seed=i, prefix_len=i + 1))
             for i, n in enumerate(["a", "a", "b"])]
    total = sum(m.size_bytes for m in metas)
    counter = redis_store.keys.stored_bytes("acme")
    plain = redis.Redis.from_url(redis_url)
    try:
        assert int(plain.get(counter)) == total
        plain.delete(counter)
        assert (await redis_store.usage("acme")).stored_bytes == total
        assert int(plain.get(counter)) == total
        plain.delete(counter)
        await redis_store.delete("acme", "b")  # without a counter, delete leaves it missing
        assert plain.get(counter) is None
        extra = await redis_store.put(make_artifact(name="c"))  # recounts, then adds
        assert int(plain.get(counter)) == metas[0].size_bytes + metas[1].size_bytes + \
            extra.size_bytes
    finally:
        plain.close()
