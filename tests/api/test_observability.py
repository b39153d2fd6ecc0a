"""/health, /ready, /metrics (per-app registry), the request log line, the last-resort 500, and
the OpenAPI document describing every route's request, response and errors."""

from __future__ import annotations

import json
import logging

import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.models.loader import LoadedModel
from tests.api.conftest import Served
from tests.api.helpers import (
    ADMIN_KEY,
    auth,
    create_tenant,
    prefix_tensors,
    safetensors_file,
    upload,
)


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


async def test_health_and_ready(server: Served) -> None:
    assert (await server.client.get("/health")).json() == {"status": "ok"}
    ready = await server.client.get("/ready")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready",
                            "checks": {"model": "ok", "engine": "ok", "registry": "ok"}}


async def test_metrics(server: Served, loaded: LoadedModel) -> None:
    key = await create_tenant(server.client, "acme")
    await upload(server.client, key, "style", {"p.safetensors": safetensors_file(
        prefix_tensors(loaded))})
    for _ in range(2):
        response = await server.client.post("/generate", headers=auth(key), json={
            "prompt": "hello world", "max_new_tokens": 4, "prefix_id": "style"})
        assert response.status_code == 200
    await server.client.post("/generate", headers=auth(key), json={"prompt": ""})
    text = (await server.client.get("/metrics", headers=auth(ADMIN_KEY))).text
    got = samples(text)
    ok = frozenset({("route", "/generate"), ("status", "200"), ("tenant", "acme")})
    bad = frozenset({("route", "/generate"), ("status", "422"), ("tenant", "acme")})
    assert got[("prefix_serve_requests_total", ok)] == 2
    assert got[("prefix_serve_requests_total", bad)] == 1
    assert got[("prefix_serve_time_to_first_token_seconds_count",
                frozenset({("tenant", "acme")}))] == 2
    assert got[("prefix_serve_inter_token_latency_seconds_count", frozenset())] >= 1
    completion = json.loads(response.text)["usage"]["completion_tokens"]
    tokens = got[("prefix_serve_generated_tokens_total", frozenset({("tenant", "acme")}))]
    assert tokens == 2 * completion
    assert got[("prefix_serve_prefix_cache_misses_total", frozenset())] == 1
    assert got[("prefix_serve_prefix_cache_hits_total", frozenset())] == 1
    assert got[("prefix_serve_prefix_cache_bytes", frozenset())] > 0
    assert got[("prefix_serve_running_requests", frozenset())] == 0
    assert got[("prefix_serve_queued_requests", frozenset())] == 0


async def test_one_log_line_per_request(server: Served, caplog: pytest.LogCaptureFixture) -> None:
    key = await create_tenant(server.client, "acme")
    with caplog.at_level(logging.INFO, logger="prefix_serve.access"):
        await server.client.post("/generate", headers={**auth(key), "X-Request-ID": "abc-1"},
                                 json={"prompt": "hello world", "max_new_tokens": 3})
    lines = [json.loads(r.getMessage()) for r in caplog.records
             if r.name == "prefix_serve.access"]
    assert len(lines) == 1
    line = lines[0]
    assert line["request_id"] == "abc-1" and line["status"] == 200 and line["tenant"] == "acme"
    assert line["path"] == "/generate" and line["completion_tokens"] == 3
    assert {"ttft_s", "total_s", "duration_s", "finish_reason", "prompt_tokens"} <= set(line)


async def test_unexpected_failure_is_a_logged_500_in_the_error_format(
    server: Served, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(server.services.store, "list_tenants", broken)
    response = await server.client.get("/admin/tenants", headers=auth(ADMIN_KEY))
    assert response.status_code == 500
    assert response.json() == {"error": {"type": "internal_error",
                                         "message": "internal server error (logged)"}}
    assert response.headers["x-request-id"]
    assert any("RuntimeError: bug" in (r.exc_text or "") for r in caplog.records)


async def test_openapi_describes_every_route(server: Served) -> None:
    doc = (await server.client.get("/openapi.json")).json()
    paths = doc["paths"]
    expected = {
        ("/generate", "post"), ("/v1/completions", "post"), ("/v1/chat/completions", "post"),
        ("/v1/models", "get"), ("/admin/prefixes", "post"), ("/admin/prefixes", "get"),
        ("/admin/prefixes/{name}", "get"), ("/admin/prefixes/{name}", "delete"),
        ("/admin/tenants", "post"), ("/admin/tenants", "get"),
        ("/admin/tenants/{name}/keys", "post"), ("/admin/tenants/{name}/keys/{key_id}", "delete"),
        ("/health", "get"), ("/ready", "get"), ("/metrics", "get"),
    }
    assert expected <= {(p, m) for p, ops in paths.items() for m in ops}
    for path, method in expected - {("/health", "get"), ("/metrics", "get")}:
        responses = paths[path][method]["responses"]
        codes = {c for c in responses if c.startswith(("4", "5"))}
        assert codes, (path, method)
        for code in codes - {"422"} if path == "/ready" else codes:
            ref = json.dumps(responses[code])
            assert "ErrorBody" in ref or "ReadyOut" in ref, (path, method, code)
    upload_body = paths["/admin/prefixes"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in upload_body
    assert paths["/generate"]["post"]["requestBody"]["content"]["application/json"]
    assert "text/event-stream" in paths["/generate"]["post"]["responses"]["200"]["content"]
    assert "ErrorBody" in doc["components"]["schemas"]
    assert "HTTPValidationError" not in doc["components"]["schemas"]  # 422s use ErrorBody too
