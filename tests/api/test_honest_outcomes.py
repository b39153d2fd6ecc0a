"""Outcomes reported as they happened: an OpenAI-route request cut short by shutdown ends with
`finish_reason: "abort"` (vLLM's word for an aborted request), streamed or not, never "stop"; and
every auth refusal says why in the access log and in `prefix_serve_request_errors`."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from server.models.loader import LoadedModel
from tests.api.conftest import Served, SettingsFactory
from tests.api.helpers import ADMIN_KEY, auth, create_tenant
from tests.api.live import LiveServer, live_server, wait_for
from tests.api.test_observability import samples

PROMPT = "the quick brown fox"
MAX_TOKENS = 200  # far more than is generated before the shutdown below cuts it (greedy
# decoding of PROMPT by the tiny model reaches no end-of-text that early)


def _body(route: str, model: str, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": MAX_TOKENS, "temperature": 0,
                            "stream": stream}
    if route == "/v1/completions":
        return body | {"prompt": PROMPT}
    return body | {"messages": [{"role": "user", "content": PROMPT}]}


@pytest.fixture
def live(make_settings: SettingsFactory, loaded: LoadedModel) -> Iterator[LiveServer]:
    """A real uvicorn (the in-process transport does not stream)."""
    with live_server(make_settings(), loaded) as server:
        yield server


def _cut_short(live: LiveServer) -> None:
    """What shutdown does once its grace period is over: cancel whatever still runs."""
    engine = live.services.engine
    assert engine is not None
    engine.shutdown_now()


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
async def test_a_stream_cut_by_shutdown_ends_abort(live: LiveServer, loaded: LoadedModel,
                                                   route: str) -> None:
    chunks: list[Any] = []
    async with httpx.AsyncClient(base_url=live.url, timeout=60) as client, client.stream(
            "POST", route, headers=auth(ADMIN_KEY),
            json=_body(route, loaded.name, stream=True)) as response:
        assert response.status_code == 200
        cut = False
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            chunks.append(data if data == "[DONE]" else json.loads(data))
            if not cut and _text(chunks[-1]):  # generation is under way: cut it
                await asyncio.to_thread(_cut_short, live)
                cut = True
    finals = [c["choices"][0]["finish_reason"] for c in chunks
              if isinstance(c, dict) and c.get("choices") and c["choices"][0]["finish_reason"]]
    assert finals == ["abort"]
    assert chunks[-1] == "[DONE]"


def _text(chunk: Any) -> str:
    if not isinstance(chunk, dict) or not chunk.get("choices"):
        return ""
    choice = chunk["choices"][0]
    return str(choice.get("text") or (choice.get("delta") or {}).get("content") or "")


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
async def test_a_response_cut_by_shutdown_ends_abort(live: LiveServer, loaded: LoadedModel,
                                                     route: str) -> None:
    engine = live.services.engine
    assert engine is not None
    async with httpx.AsyncClient(base_url=live.url, timeout=60) as client:
        request = asyncio.ensure_future(client.post(
            route, headers=auth(ADMIN_KEY), json=_body(route, loaded.name, stream=False)))
        await asyncio.to_thread(wait_for, lambda: engine.stats().tokens_generated > 0)
        await asyncio.to_thread(_cut_short, live)
        response = await request
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] == "abort"
    assert response.json()["usage"]["completion_tokens"] < MAX_TOKENS


async def test_auth_refusals_are_typed_in_the_log_and_metrics(
    server: Served, caplog: pytest.LogCaptureFixture
) -> None:
    key = await create_tenant(server.client, "acme")
    generate = {"prompt": "hi", "max_new_tokens": 1}
    with caplog.at_level(logging.INFO, logger="prefix_serve.access"):
        refusals = {
            "missing_key": await server.client.post("/generate", json=generate),
            "malformed_key": await server.client.post(
                "/generate", json=generate, headers={"Authorization": "Basic abc"}),
            "invalid_key": await server.client.post(
                "/generate", json=generate, headers=auth("psk-not-a-key")),
            "operator_only": await server.client.get("/admin/tenants", headers=auth(key)),
            "other_tenant": await server.client.post(
                "/generate", json=generate, headers={**auth(key), "X-Tenant": "beta"}),
        }
    assert {reason: r.status_code for reason, r in refusals.items()} == {
        "missing_key": 401, "malformed_key": 401, "invalid_key": 401,
        "operator_only": 403, "other_tenant": 403}
    assert {r.json()["error"]["type"] for r in refusals.values()} == {
        "authentication_error", "permission_denied"}  # the body keeps the SDK's types
    lines = [json.loads(r.getMessage()) for r in caplog.records
             if r.name == "prefix_serve.access"]
    assert [line.get("error_type") for line in lines] == list(refusals)
    got = samples((await server.client.get("/metrics", headers=auth(ADMIN_KEY))).text)
    errors = {dict(labels)["type"]: value for (name, labels), value in got.items()
              if name == "prefix_serve_request_errors_total"}
    assert {reason: errors.get(reason) for reason in refusals} == dict.fromkeys(refusals, 1.0)
