"""Auth and prefix lookups survive Redis trouble: a private `redis-server` is killed under the real
app. Known keys with prefixes already resolved keep being served; what needs Redis is a 503
`registry_unavailable` with Retry-After; everything recovers by itself when Redis returns.
Revocations reach every server's key cache at once over pub/sub, and the TTL bounds them without
it. A cold burst never runs out of Redis connections."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from server.models.loader import LoadedModel
from server.settings import Settings
from tests.api.conftest import Served, serve
from tests.api.helpers import ADMIN_KEY, auth, create_tenant, prefix_tensors, safetensors_file
from tests.api.helpers import upload as upload_files
from tests.redis_server import RedisServer, redis_missing

pytestmark = pytest.mark.skipif(redis_missing() is not None, reason=str(redis_missing()))
GEN = {"prompt": "hello", "max_new_tokens": 2}


@pytest.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", aof=True)
    server.start()
    yield server
    server.stop()


def _settings(loaded: LoadedModel, url: str, tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(
        model=loaded.name, admin_key=ADMIN_KEY, redis_url=url, namespace="outage",
        data_dir=tmp_path / "data", max_batch_size=4, max_queue=512, kv_cache_mb=1.0,
        prefix_cache_mb=8.0, shutdown_grace_s=2.0, max_upload_mb=1.0,
    )
    values.update(overrides)
    return Settings(**values)


async def _upload(served: Served, key: str, loaded: LoadedModel, seed: int = 0) -> httpx.Response:
    files = {"p.safetensors": safetensors_file(prefix_tensors(loaded, seed=seed))}
    return await upload_files(served.client, key, "style", files)


async def _eventually(check: Callable[[], Any], timeout_s: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def test_known_keys_and_resolved_prefixes_are_served_through_an_outage(
    private_redis: RedisServer, loaded: LoadedModel, tmp_path: Path
) -> None:
    async with serve(_settings(loaded, private_redis.url, tmp_path), loaded) as served:
        key = await create_tenant(served.client, "acme")
        other = await create_tenant(served.client, "beta")  # never used before the outage
        assert (await _upload(served, key, loaded)).status_code == 201
        body = {**GEN, "prefix_id": "style"}
        before = await served.client.post("/generate", headers=auth(key), json=body)
        assert before.status_code == 200, before.text

        private_redis.kill()
        during = [await served.client.post("/generate", headers=auth(key), json=body)
                  for _ in range(5)]
        assert [r.status_code for r in during] == [200] * 5, during[-1].text
        assert during[0].json()["text"] == before.json()["text"]
        for response in (await _upload(served, key, loaded, seed=1),
                         await served.client.post("/generate", headers=auth(other), json=GEN),
                         await served.client.post("/generate", headers=auth(key),
                                                  json={**GEN, "prefix_id": "unknown"})):
            assert response.status_code == 503, response.text
            assert response.json()["error"]["type"] == "registry_unavailable"
            assert response.headers["retry-after"]
        assert (await served.client.get("/health")).status_code == 200  # alive, only not ready

        private_redis.start()  # same port, AOF: the data is back; the app was never restarted

        async def recovered() -> bool:
            return (await _upload(served, key, loaded, seed=2)).status_code == 201
        await _eventually(recovered)
        again = await served.client.post("/generate", headers=auth(other), json=GEN)
        assert again.status_code == 200, again.text
        assert (await served.client.get("/ready")).status_code == 200


async def test_a_revocation_reaches_another_server_at_once(
    private_redis: RedisServer, loaded: LoadedModel, tmp_path: Path
) -> None:
    ttl = dict(auth_cache_ttl_s=3600.0)  # only the announcement can make it forget the key
    async with serve(_settings(loaded, private_redis.url, tmp_path, **ttl), loaded) as a, \
            serve(_settings(loaded, private_redis.url, tmp_path, **ttl), loaded) as b:
        created = await a.client.post("/admin/tenants", headers=auth(ADMIN_KEY),
                                      json={"name": "acme"})
        key, key_id = created.json()["api_key"], created.json()["key_id"]
        assert (await b.client.post("/generate", headers=auth(key), json=GEN)).status_code == 200
        revoked = await a.client.delete(f"/admin/tenants/acme/keys/{key_id}",
                                        headers=auth(ADMIN_KEY))
        assert revoked.status_code == 200

        async def refused() -> bool:
            response = await b.client.post("/generate", headers=auth(key), json=GEN)
            return response.status_code == 401
        await _eventually(refused, timeout_s=10)


async def test_without_an_announcement_the_ttl_bounds_a_revocation(
    private_redis: RedisServer, loaded: LoadedModel, tmp_path: Path
) -> None:
    settings = _settings(loaded, private_redis.url, tmp_path, auth_cache_ttl_s=0.5)
    async with serve(settings, loaded) as served:
        key = await create_tenant(served.client, "acme")
        assert (await served.client.post("/generate", headers=auth(key),
                                         json=GEN)).status_code == 200
        raw = redis.Redis(port=private_redis.port)
        for name in raw.scan_iter("outage:*key-hashes"):  # behind the registry's back
            raw.delete(name)
        raw.close()

        async def refused() -> bool:
            response = await served.client.post("/generate", headers=auth(key), json=GEN)
            return response.status_code == 401
        await _eventually(refused, timeout_s=20)


async def test_a_cold_burst_waits_for_pooled_connections(
    private_redis: RedisServer, loaded: LoadedModel, tmp_path: Path
) -> None:
    """120 concurrent requests on a just-started server: every tenant-key request looks its key
    up and every prefix reference resolves; with a pool of 2 connections none may fail (the
    300-request burst on a real server process: tests/reliability/)."""
    settings = _settings(loaded, private_redis.url, tmp_path, redis_max_connections=2,
                         redis_pool_timeout_s=30.0)
    async with serve(settings, loaded) as served:
        keys = [await create_tenant(served.client, f"t{i}") for i in range(3)]
        for key in keys:
            assert (await _upload(served, key, loaded)).status_code == 201
    async with serve(settings, loaded) as served:  # cold: nothing cached
        bodies = [{**GEN, "max_new_tokens": 1, "prefix_id": "style"}, GEN]
        responses = await asyncio.gather(*(
            served.client.post("/generate", headers=auth(keys[i % 3]), json=bodies[i % 2])
            for i in range(120)))
        statuses = [r.status_code for r in responses]
        failures = {r.text[:300] for r in responses if r.status_code != 200}
        assert statuses.count(200) == 120, failures
