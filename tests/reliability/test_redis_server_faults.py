"""One real `prefix-serve` process on a private `redis-server`, through the faults a production
server meets, in this order (the first needs the cold server, the last ends it):

1. a burst of 300 concurrent streams right after start (nothing cached);
2. the hostile corpus (>= 100 inputs), then a normal request;
3. Redis killed (kill -9) and restarted with AOF, under upload and generation traffic;
4. Redis killed and restarted without persistence;
5. SIGTERM while streams are running.
"""

from __future__ import annotations

import asyncio
import io
import json
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from bench.load import Target, burst, p_theta_file, setup_tenants
from server.models.loader import LoadedModel
from tests.redis_server import RedisServer, redis_missing
from tests.reliability.conftest import record
from tests.reliability.hostile import Shape, corpus
from tests.reliability.procs import ADMIN_KEY, ServerProcess
from tests.reliability.runner import run_corpus, slow_body_status

pytestmark = pytest.mark.skipif(redis_missing() is not None, reason=str(redis_missing()))
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
LIMITS = httpx.Limits(max_connections=None, max_keepalive_connections=None)
DEADLINE_S = 60.0


@pytest.fixture(scope="module")
def redis_aof(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis-aof"), aof=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def server(model_dir: Path, redis_aof: RedisServer,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = ServerProcess(model_dir, tmp_path_factory.mktemp("server"), [
        "--redis-url", redis_aof.url, "--namespace", "reliability", "--body-timeout-s", "2",
        "--auth-cache-ttl-s", "30"])
    record("startup", redis_server_s=round(process.start(), 1))
    yield process
    process.stop()


def _client() -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=120, limits=LIMITS)


def _shape(model: LoadedModel) -> tuple[int, int]:
    return model.fingerprint.num_layers, model.fingerprint.hidden_size


async def test_a_cold_burst_of_300_streams_gets_no_5xx(server: ServerProcess,
                                                       model: LoadedModel) -> None:
    async with _client() as client:
        tenants = await setup_tenants(client, Target(server.url, ADMIN_KEY), _shape(model),
                                      tenants=3, prefixes=2, run="burst")
    # A fresh client: no keep-alive connection the server may be closing as the burst starts.
    async with _client() as client:
        report = await burst(client, server.url, tenants, requests=300, max_new_tokens=4)
    summary = report.summary()
    record("cold burst", requests=300, statuses=summary["statuses"], **{"5xx": summary["5xx"]},
           completed=summary["completed_streams"], errors=summary["errors"],
           wall_s=summary["wall_s"],
           p99_s=summary["latency_p99_s"])
    assert report.server_errors == 0, (summary, server.tail())
    # The queue (1024) holds the whole burst: a 429 would mean a refusal before the queue.
    assert summary["statuses"] == {200: 300} and report.completed_streams == 300, summary


async def test_the_hostile_corpus_gets_no_5xx_and_the_engine_lives(
    server: ServerProcess, model: LoadedModel
) -> None:
    fp = model.fingerprint
    shape = Shape(fp.num_layers, fp.hidden_size, fp.num_kv_heads, fp.head_dim, model.max_context)
    cases = corpus(shape)
    assert len(cases) >= 100
    async with _client() as client:
        created = await client.post(f"{server.url}/admin/tenants", headers=ADMIN,
                                    json={"name": "hostile"})
        key = created.json()["api_key"]
        keys = {"tenant": f"Bearer {key}", "operator": f"Bearer {ADMIN_KEY}"}
        report = await run_corpus(client, server.url, cases, keys, base_model=model.name)
        slow = await asyncio.to_thread(slow_body_status, server.url, key)
        health = await client.get(f"{server.url}/health")
        normal = await client.post(f"{server.url}/generate", headers={"Authorization":
                                   f"Bearer {key}"}, json={"prompt": "hello", "max_new_tokens": 4})
    statuses = dict(sorted(report.statuses.items()))
    record("hostile corpus", inputs=len(cases) + 1, statuses=statuses,
           **{"5xx": len(report.server_errors)}, slow_body=slow,
           engine_alive=health.status_code == 200 and normal.status_code == 200)
    assert report.server_errors == [], "\n".join(report.server_errors) + server.tail()
    assert report.unexpected == [], "\n".join(report.unexpected)
    assert report.bad_format == [], "\n".join(report.bad_format)
    assert slow == 408
    assert health.status_code == 200 and normal.status_code == 200, normal.text


async def _outage_traffic(server: ServerProcess, redis: RedisServer, model: LoadedModel,
                          restart: RedisServer) -> dict[str, object]:
    """Uploads and cached-prefix generations keep going while `redis` is killed and `restart`
    comes up on its port; returns what was seen."""
    async with _client() as client:
        await _until_ready(client, server)
        tenant = await _tenant_with_cached_prefix(client, server, model, f"out{restart.aof:d}")
        seen: dict[str, Counter[int]] = {"before": Counter(), "during": Counter(),
                                         "after": Counter()}
        during_uploads: Counter[int] = Counter()
        acked: list[int] = []
        phase = {"name": "before"}
        stop = asyncio.Event()

        async def generations() -> None:
            while not stop.is_set():
                r = await client.post(f"{server.url}/generate", headers=tenant["auth"],
                                      json={"prompt": "hi", "max_new_tokens": 2,
                                            "prefix_id": "style"})
                seen[phase["name"]][r.status_code] += 1
                await asyncio.sleep(0.01)

        async def uploads(worker: int) -> None:
            i = 0
            while not stop.is_set():
                i += 1
                r = await _upload(client, server.url, tenant["auth"], model, f"u{worker}", i)
                if r.status_code == 201:
                    acked.append(r.json()["version"] * 1000 + worker)
                elif phase["name"] == "during":
                    during_uploads[r.status_code] += 1
                    # 503 registry_unavailable, or 429 too_many_uploads while two uploads of
                    # this tenant wait for Redis (--max-concurrent-uploads-per-tenant): both
                    # say when to come back.
                    assert r.status_code not in (429, 503) or r.headers.get("retry-after"), r.text
                await asyncio.sleep(0.02)

        tasks = [asyncio.create_task(generations()) for _ in range(2)]
        tasks += [asyncio.create_task(uploads(w)) for w in range(3)]
        await asyncio.sleep(1.5)
        redis.kill()
        phase["name"] = "during"
        await asyncio.sleep(2.0)
        restart.start()
        restarted = time.monotonic()
        phase["name"] = "after"
        recovered = await _first_success(client, server, tenant, model)
        recovery_s = time.monotonic() - restarted
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*tasks)
        ready = await _until_ready(client, server)
        missing = await _missing_uploads(client, server.url, tenant["auth"], acked)
        known_key, known_key_s = await _known_key_status(client, server, tenant, restart.aof)
    return {"seen": seen, "during_uploads": during_uploads, "acked": len(acked),
            "missing": missing, "recovery_s": round(recovery_s, 2), "recovered": recovered,
            "ready_s": round(ready, 2), "known_key_after": known_key,
            "known_key_s": round(known_key_s, 2)}


async def _known_key_status(client: httpx.AsyncClient, server: ServerProcess,
                            tenant: dict[str, object], persisted: bool) -> tuple[int, float]:
    """The status the tenant's key gets after the outage, and when. Without persistence Redis
    forgot it: the server refuses it once it verifies it again (at the listener's reset, at the
    latest after --auth-cache-ttl-s)."""
    started = time.monotonic()
    while True:
        r = await client.post(f"{server.url}/generate", headers=tenant["auth"],  # type: ignore[arg-type]
                              json={"prompt": "hi", "max_new_tokens": 2})
        if persisted or r.status_code != 200 or time.monotonic() - started > DEADLINE_S:
            return r.status_code, time.monotonic() - started
        await asyncio.sleep(0.1)


async def test_a_redis_outage_with_aof_loses_nothing_and_recovers(
    server: ServerProcess, redis_aof: RedisServer, model: LoadedModel
) -> None:
    seen = await _outage_traffic(server, redis_aof, model, restart=redis_aof)
    during = seen["seen"]["during"]  # type: ignore[index]
    record("redis outage (AOF)", cached_during=dict(during), uploads_during=dict(
        seen["during_uploads"]), acked_uploads=seen["acked"], lost_writes=len(seen["missing"]),
        recovery_s=seen["recovery_s"], ready_after_s=seen["ready_s"])
    assert set(during) == {200} and during[200] > 0, seen
    assert set(seen["during_uploads"]) <= {429, 503}, seen  # type: ignore[arg-type]
    assert seen["during_uploads"][503] > 0, seen  # type: ignore[index]
    assert seen["recovered"] and seen["missing"] == [], seen
    assert seen["known_key_after"] == 200


async def test_a_redis_outage_without_persistence_recovers(
    server: ServerProcess, redis_aof: RedisServer, model: LoadedModel,
    tmp_path: Path
) -> None:
    volatile = RedisServer(tmp_path / "redis-volatile", aof=False, port=redis_aof.port)
    redis_aof.stop()  # the same port, now without persistence
    volatile.start()
    try:
        seen = await _outage_traffic(server, volatile, model, restart=volatile)
    finally:
        volatile.stop()
        redis_aof.start()  # back for the SIGTERM scenario
    during = seen["seen"]["during"]  # type: ignore[index]
    record("redis outage (no persistence)", cached_during=dict(during),
           uploads_during=dict(seen["during_uploads"]), recovery_s=seen["recovery_s"],
           ready_after_s=seen["ready_s"], forgotten_key_refused_after_s=seen["known_key_s"])
    assert set(during) == {200} and during[200] > 0, seen
    assert seen["recovered"], seen
    # Redis came back empty: the key it no longer knows is refused (its cache re-verified).
    assert seen["known_key_after"] == 401


async def test_sigterm_lets_running_streams_end_with_their_final_event(
    server: ServerProcess
) -> None:
    async with _client() as client:
        await _until_ready(client, server)
        created = await client.post(f"{server.url}/admin/tenants", headers=ADMIN,
                                    json={"name": "draining"})
        auth = {"Authorization": f"Bearer {created.json()['api_key']}"}
        started = [asyncio.Event() for _ in range(8)]

        async def stream(i: int) -> str:
            body = {"prompt": f"stream {i}", "max_new_tokens": 240, "stream": True}
            last = ""
            async with client.stream("POST", f"{server.url}/generate", json=body,
                                     headers=auth) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if line.startswith("event:"):
                        last = line[6:].strip()
                        started[i].set()
                    elif line.startswith("data:") and last == "done":
                        return str(json.loads(line[5:])["finish_reason"])
            return f"ended after {last!r}"

        tasks = [asyncio.create_task(stream(i)) for i in range(8)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), DEADLINE_S)
        signalled = time.monotonic()
        server.signal(signal.SIGTERM)
        await asyncio.sleep(0.2)
        try:
            late = (await client.post(f"{server.url}/generate", headers=auth,
                                      json={"prompt": "late"})).status_code
        except httpx.ConnectError:
            late = 0  # no longer accepting connections
        reasons = await asyncio.wait_for(asyncio.gather(*tasks), DEADLINE_S)
    code = await asyncio.to_thread(server.wait, DEADLINE_S)
    record("SIGTERM", streams=8, finish_reasons=dict(Counter(reasons)), late_request=late,
           exit_code=code, drained_s=round(time.monotonic() - signalled, 1))
    assert all(r in ("length", "stop", "cancelled") for r in reasons), reasons
    # uvicorn re-raises the signal once it has shut down, so the exit status is SIGTERM's own
    # (143 in a shell), what orchestrators expect of a process they stopped.
    assert late in (0, 503) and code in (0, -signal.SIGTERM), server.tail()


async def _tenant_with_cached_prefix(client: httpx.AsyncClient, server: ServerProcess,
                                     model: LoadedModel, name: str) -> dict[str, object]:
    created = await client.post(f"{server.url}/admin/tenants", headers=ADMIN,
                                json={"name": name})
    assert created.status_code == 201, created.text
    auth = {"Authorization": f"Bearer {created.json()['api_key']}"}
    assert (await _upload(client, server.url, auth, model, "style", 0)).status_code == 201
    warm = await client.post(f"{server.url}/generate", headers=auth,
                             json={"prompt": "hi", "max_new_tokens": 2, "prefix_id": "style"})
    assert warm.status_code == 200, warm.text
    return {"auth": auth}


async def _upload(client: httpx.AsyncClient, url: str, auth: object, model: LoadedModel,
                  name: str, seed: int) -> httpx.Response:
    layers, hidden = _shape(model)
    data = p_theta_file(layers, 4, hidden, seed)
    files = {"file": ("p.safetensors", io.BytesIO(data), "application/octet-stream")}
    return await client.post(f"{url}/admin/prefixes", headers=auth,  # type: ignore[arg-type]
                             data={"name": name}, files=files)


async def _first_success(client: httpx.AsyncClient, server: ServerProcess,
                         tenant: dict[str, object], model: LoadedModel) -> bool:
    """Wait until a write through the server succeeds again (a new tenant: it needs Redis
    whatever Redis came back with)."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        name = f"probe{np.random.default_rng().integers(1 << 30)}"
        r = await client.post(f"{server.url}/admin/tenants", headers=ADMIN, json={"name": name})
        if r.status_code == 201:
            return True
        await asyncio.sleep(0.05)
    return False


async def _until_ready(client: httpx.AsyncClient, server: ServerProcess) -> float:
    started = time.monotonic()
    while (await client.get(f"{server.url}/ready")).status_code != 200:
        assert time.monotonic() - started < DEADLINE_S, server.tail()
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def _missing_uploads(client: httpx.AsyncClient, url: str, auth: object,
                           acked: list[int]) -> list[str]:
    """Acknowledged (version * 1000 + worker) uploads that the registry no longer has."""
    missing = []
    for worker in {a % 1000 for a in acked}:
        r = await client.get(f"{url}/admin/prefixes/u{worker}", headers=auth)  # type: ignore[arg-type]
        stored = {v["version"] for v in r.json().get("versions", [])} if r.status_code == 200 \
            else set()
        missing += [f"u{worker}@{a // 1000}" for a in acked
                    if a % 1000 == worker and a // 1000 not in stored]
    return missing
