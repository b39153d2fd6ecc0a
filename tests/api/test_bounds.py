"""No request can hurt another: every numeric field and list is bounded at the schema, so the
request that once killed the engine for everyone is a 4xx, and `/health` reports a dead engine
(liveness probes restart the process)."""

from __future__ import annotations

import asyncio

import pytest

from server.models.loader import LoadedModel
from tests.api.conftest import Served
from tests.api.helpers import ADMIN_KEY, auth

# The exact request of the report: top_k = 2**63 overflowed a tensor inside the engine's step.
KILLER = {"prompt": "hello", "max_new_tokens": 4, "temperature": 1.0,
          "top_k": 9223372036854775808}


async def _still_serving(served: Served) -> None:
    ready = await served.client.get("/ready")
    assert ready.status_code == 200, ready.text
    ok = await served.client.post("/generate", headers=auth(ADMIN_KEY),
                                  json={"prompt": "hello", "max_new_tokens": 2})
    assert ok.status_code == 200, ok.text


async def test_the_engine_killing_request_is_a_4xx_and_the_engine_lives(server: Served) -> None:
    response = await server.client.post("/generate", headers=auth(ADMIN_KEY), json=KILLER)
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["error"]["type"] == "validation_error"
    await _still_serving(server)


@pytest.mark.parametrize("fields", [
    {"top_k": 2**31}, {"seed": 2**64}, {"seed": -1}, {"max_new_tokens": 10**12},
    {"temperature": 1e308}, {"stop": ["x"] * 17}, {"stop": ["x" * 257]},
])
async def test_generate_fields_are_bounded(server: Served, fields: dict) -> None:
    body = {"prompt": "hello", "max_new_tokens": 4, "temperature": 1.0, **fields}
    response = await server.client.post("/generate", headers=auth(ADMIN_KEY), json=body)
    assert response.status_code == 422, response.text
    await _still_serving(server)


@pytest.mark.parametrize("fields", [
    {"seed": 2**64}, {"max_tokens": 10**12}, {"n": 10**30}, {"stop": ["x" * 257]},
    {"stop": "x" * 257}, {"prompt": [2**63]}, {"prompt": [-1]},
])
async def test_completion_fields_are_bounded(server: Served, loaded: LoadedModel,
                                             fields: dict) -> None:
    body = {"model": loaded.name, "prompt": "hello", "max_tokens": 2, "temperature": 1.0,
            **fields}
    response = await server.client.post("/v1/completions", headers=auth(ADMIN_KEY), json=body)
    assert 400 <= response.status_code < 500, response.text
    await _still_serving(server)


@pytest.mark.parametrize("fields", [
    {"seed": 2**64}, {"max_completion_tokens": 10**12}, {"stop": ["x"] * 17},
    {"messages": [{"role": "user", "content": "hi"}] * 10_000},
])
async def test_chat_fields_are_bounded(server: Served, loaded: LoadedModel, fields: dict) -> None:
    body = {"model": loaded.name, "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2, **fields}
    response = await server.client.post("/v1/chat/completions", headers=auth(ADMIN_KEY),
                                        json=body)
    assert 400 <= response.status_code < 500, response.text
    await _still_serving(server)


async def test_health_fails_when_the_engine_is_dead(server: Served) -> None:
    assert (await server.client.get("/health")).status_code == 200
    engine = server.services.engine

    def broken() -> None:
        raise RuntimeError("device lost")

    engine.step = broken  # type: ignore[method-assign]  # the next loop iteration dies
    for _ in range(600):
        if not engine.alive:
            break
        await asyncio.sleep(0.05)
    assert not engine.alive
    health = await server.client.get("/health")
    assert health.status_code == 503, health.text
    assert health.json()["status"] == "engine_dead"
    assert (await server.client.get("/ready")).status_code == 503
