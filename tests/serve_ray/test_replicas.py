"""The HTTP API over two engine replicas on a local Ray cluster (CPU, tiny model), end to end:
prefix affinity read from `X-Prefix-Serve-Replica`, uploads seen by every ingress replica,
a replica killed during traffic, and greedy output equal to the single-process server's."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import ray
from ray import serve

from server.app import create_app
from server.models.loader import LoadedModel
from server.serve_ray.messages import ReplicaInfo
from tests.api.helpers import ADMIN_KEY, auth, parse_sse, prefix_tensors, safetensors_file
from tests.serve_ray.conftest import RayServed

HEADER = "x-prefix-serve-replica"
DEADLINE_S = 120.0  # generous: replicas restart on a loaded 2-core machine


@pytest.fixture
async def client(ray_served: RayServed) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=ray_served.url, timeout=120) as c:
        yield c


async def _upload(client: httpx.AsyncClient, key: str, loaded: LoadedModel, name: str,
                  seed: int = 0) -> int:
    data = safetensors_file(prefix_tensors(loaded, seed=seed))
    files = [("file", ("p.safetensors", data, "application/octet-stream"))]
    response = await client.post("/admin/prefixes", headers=auth(key), data={"name": name},
                                 files=files)
    assert response.status_code == 201, response.text
    return int(response.json()["version"])


async def _generate(client: httpx.AsyncClient, key: str, prefix: str | None, **body: Any
                    ) -> httpx.Response:
    payload = {"prompt": "Hello world", "max_new_tokens": 8, **body}
    if prefix is not None:
        payload["prefix_id"] = prefix
    return await client.post("/generate", headers=auth(key), json=payload)


async def test_a_prefix_stays_on_its_replica_and_prefixes_use_both(
    ray_served: RayServed, client: httpx.AsyncClient, loaded: LoadedModel
) -> None:
    names = [f"affinity{i}" for i in range(8)]
    for i, name in enumerate(names):
        await _upload(client, ray_served.key, loaded, name, seed=i)
    home: dict[str, str] = {}
    for name in names:  # one at a time: the router learns where each one was loaded
        response = await _generate(client, ray_served.key, name)
        assert response.status_code == 200, response.text
        home[name] = response.headers[HEADER]
        assert len(response.headers.get_list("x-request-id")) == 1  # Ray's proxy sets it too
        await asyncio.sleep(1.0)  # replicas report their loaded prefixes to the router
    assert len(set(home.values())) == 2, f"every prefix went to one replica: {home}"
    await asyncio.sleep(5.0)  # generous on a loaded machine: the reports are asynchronous
    for _ in range(3):
        for name in names:
            response = await _generate(client, ray_served.key, name)
            assert response.status_code == 200, response.text
            assert response.headers[HEADER] == home[name], f"{name} moved replica"
    for path in ("/v1/completions", "/v1/chat/completions"):
        body: dict[str, Any] = {"model": names[0], "max_tokens": 4}
        body |= {"prompt": "Hi"} if path == "/v1/completions" else {
            "messages": [{"role": "user", "content": "Hi"}]}
        response = await client.post(path, headers=auth(ray_served.key), json=body)
        assert response.status_code == 200, response.text
        assert response.headers[HEADER] == home[names[0]]
    for name in names:  # each replica's own engine counters, asked through the prefix it holds
        info = await _replica_holding(f"acme/{name}@1", home[name])
        assert info.stats.tokens_generated > 0
    metrics = await client.get("/metrics", headers=auth(ADMIN_KEY))
    assert metrics.status_code == 200 and "prefix_serve_requests" in metrics.text


async def test_uploads_and_deletes_reach_every_ingress_within_a_second(
    ray_served: RayServed, client: httpx.AsyncClient, loaded: LoadedModel
) -> None:
    """After an upload, what is served is the new version's output (greedy text equal to the
    same tensors' under a name never used before), not only the version number reported."""
    key = ray_served.key
    assert await _upload(client, key, loaded, "fresh", seed=1) == 1
    for _ in range(6):  # both ingress replicas cache version 1; a replica loads it
        served = (await _generate(client, key, "fresh")).json()
        assert served["prefix"]["version"] == 1
    await _upload(client, key, loaded, "fresh-reference", seed=2)
    expected = (await _generate(client, key, "fresh-reference")).json()["text"]
    assert expected != served["text"], "seeds 1 and 2 must give different outputs"
    assert await _upload(client, key, loaded, "fresh", seed=2) == 2
    uploaded = time.monotonic()
    seen = await _served_until(client, key, "fresh", uploaded + 1.0)
    late = [v for t, v in seen if t >= uploaded + 1.0]
    assert late and set(late) == {(2, expected)}, seen
    first_v2 = min(t for t, v in seen if v == (2, expected)) - uploaded
    deleted = await client.delete("/admin/prefixes/fresh", headers=auth(key))
    assert deleted.status_code == 200, deleted.text
    gone = time.monotonic()
    seen = await _served_until(client, key, "fresh", gone + 1.0)
    assert {v for t, v in seen if t >= gone + 1.0} == {(404, "")}, seen
    print(f"\nnew version served {first_v2 * 1000:.0f} ms after the upload returned")


async def _served_until(client: httpx.AsyncClient, key: str, name: str, until: float
                        ) -> list[tuple[float, tuple[int, str]]]:
    """(time, (version, greedy text)) of requests until `until`, and 6 more after it; a
    refused request is (HTTP status, "")."""
    seen: list[tuple[float, tuple[int, str]]] = []
    while len([t for t, _ in seen if t >= until]) < 6:
        started = time.monotonic()
        response = await _generate(client, key, name)
        body = response.json()
        ok = response.status_code == 200
        seen.append((started, (body["prefix"]["version"], body["text"]) if ok else
                     (response.status_code, "")))
    return seen


async def test_greedy_output_equals_the_single_process_server(
    ray_served: RayServed, client: httpx.AsyncClient, loaded: LoadedModel
) -> None:
    key = ray_served.key
    for i in range(3):
        await _upload(client, key, loaded, f"same{i}", seed=10 + i)
    cases = [(prefix, prompt) for prefix in (None, "same0", "same1", "same2")
             for prompt in ("Hello world", "The quick brown fox")]
    through_ray = [(await _generate(client, key, p, prompt=q, max_new_tokens=24)).json()
                   for p, q in cases]
    app = create_app(ray_served.settings.model_copy(update={"replicas": None}), loaded=loaded)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://one") as one:
            alone = [(await _generate(one, key, p, prompt=q, max_new_tokens=24)).json()
                     for p, q in cases]
    assert [r["text"] for r in through_ray] == [r["text"] for r in alone]
    assert [r["usage"] for r in through_ray] == [r["usage"] for r in alone]


async def test_a_killed_replica_loses_no_request_that_had_not_started(
    ray_served: RayServed, client: httpx.AsyncClient, loaded: LoadedModel
) -> None:
    key = ray_served.key
    await _upload(client, key, loaded, "victim", seed=3)
    victim = (await _generate(client, key, "victim")).headers[HEADER]
    info = await _replica_holding("acme/victim@1", victim)
    streaming = asyncio.create_task(client.post(
        "/generate", headers=auth(key),
        json={"prefix_id": "victim", "prompt": "Once", "max_new_tokens": 200, "stream": True,
              "temperature": 1.0, "seed": 7},
    ))
    os.kill(info.pid, signal.SIGSTOP)  # frozen: requests sent now reach it and wait
    try:
        waiting = [asyncio.create_task(_generate(client, key, "victim", prompt=f"Hi {i}"))
                   for i in range(6)]
        await asyncio.sleep(1.0)
    finally:
        os.kill(info.pid, signal.SIGKILL)
    responses = await asyncio.gather(*waiting)
    assert [r.status_code for r in responses] == [200] * 6, [r.text for r in responses]
    assert all(r.headers[HEADER] != victim for r in responses)
    events = parse_sse((await streaming).text)
    last_name, last_data = events[-1]
    assert last_name in ("done", "error"), events
    if last_name == "error":  # it had started streaming on the killed replica: a clean 503 type
        assert last_data["error"]["type"] == "replica_unavailable"
    await _wait_for_replacement(client, key, loaded, victim)


async def _replica_holding(model_id: str, replica: str) -> ReplicaInfo:
    """`replica_info` of the replica that holds `model_id`, asked through this process's own
    router, which learns where each prefix is loaded asynchronously (until then, it may ask
    another replica: `replica_info` loads nothing, so the answer converges)."""
    handle = serve.get_deployment_handle("EngineReplica", app_name="prefix-serve")
    deadline = time.monotonic() + DEADLINE_S
    while True:
        info: ReplicaInfo = await handle.options(
            multiplexed_model_id=model_id).replica_info.remote()
        if info.replica == replica:
            return info
        assert time.monotonic() < deadline, f"{model_id} is not reported on {replica}"
        await asyncio.sleep(0.5)


async def _wait_for_replacement(client: httpx.AsyncClient, key: str, loaded: LoadedModel,
                                victim: str) -> None:
    """Ray starts a new replica: requests for new prefixes reach a replica id never seen before
    the kill, and both replicas are running again."""
    deadline = time.monotonic() + DEADLINE_S
    while _running_engine_replicas() < 2:
        assert time.monotonic() < deadline, "Ray did not restart the killed replica"
        await asyncio.sleep(0.5)
    seen: set[str] = set()
    i = 0
    while len(seen - {victim}) < 2:
        assert time.monotonic() < deadline, f"only replicas {seen} answer after the restart"
        i += 1
        await _upload(client, key, loaded, f"after{i}", seed=i)
        response = await _generate(client, key, f"after{i}")
        assert response.status_code == 200, response.text
        seen.add(response.headers[HEADER])
        await asyncio.sleep(0.5)
    assert victim not in seen


def _running_engine_replicas() -> int:
    app = serve.status().applications["prefix-serve"]
    states: dict[Any, int] = app.deployments["EngineReplica"].replica_states
    return sum(n for state, n in states.items() if str(state).endswith("RUNNING"))


async def test_each_replica_exports_its_engine_metrics_with_its_label(
    ray_served: RayServed, client: httpx.AsyncClient, loaded: LoadedModel
) -> None:
    """Per-replica engine series on Ray's metrics endpoint, one `replica` label value each."""
    replicas: set[str] = set()
    i = 0
    while len(replicas) < 2:  # new prefixes spread over the replicas
        i += 1
        assert i < 40, f"only {replicas} served"
        await _upload(client, ray_served.key, loaded, f"metric{i}", seed=i)
        replicas.add((await _generate(client, ray_served.key, f"metric{i}")).headers[HEADER])
    ports = {(n["NodeManagerAddress"], n["MetricsExportPort"]) for n in ray.nodes() if n["Alive"]}
    deadline = time.monotonic() + DEADLINE_S
    while True:
        text = "".join([(await client.get(f"http://{host}:{port}/metrics")).text
                        for host, port in ports])
        exported = {replica for replica in replicas if _series_for(text, replica)}
        if exported == replicas:
            break
        assert time.monotonic() < deadline, f"series only for {exported} of {replicas}"
        await asyncio.sleep(1.0)


def _series_for(text: str, replica: str) -> bool:
    name = "ray_prefix_serve_replica_engine_generated_tokens{"
    return any(line.startswith(name) and f'replica="{replica}"' in line
               and float(line.rsplit(" ", 1)[1]) > 0 for line in text.splitlines())
