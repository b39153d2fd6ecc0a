"""The Grafana dashboard in deploy/ queries only series that `/metrics` really exports, and the
error counter counts failures by their error type."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

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

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "prefix-serve.json"
SERIES = re.compile(r"\b(prefix_serve_[a-z0-9_]+)\b")


def dashboard_exprs() -> list[str]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in data["panels"] for target in panel.get("targets", [])]


def exported(text: str) -> dict[str, set[frozenset[tuple[str, str]]]]:
    """Sample name -> the label sets it was exported with."""
    out: dict[str, set[frozenset[tuple[str, str]]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, set()).add(frozenset(sample.labels.items()))
    return out


async def traffic(server: Served, loaded: LoadedModel) -> None:
    """A generation with a prefix (TTFT, ITL, tokens, cache) and two failures (404, 422)."""
    key = await create_tenant(server.client, "acme")
    await upload(server.client, key, "style",
                 {"p.safetensors": safetensors_file(prefix_tensors(loaded))})
    ok = await server.client.post("/generate", headers=auth(key), json={
        "prompt": "hello world", "max_new_tokens": 4, "prefix_id": "style"})
    assert ok.status_code == 200
    missing = await server.client.post("/generate", headers=auth(key), json={
        "prompt": "hello", "max_new_tokens": 2, "prefix_id": "nope"})
    assert missing.status_code == 404
    invalid = await server.client.post("/generate", headers=auth(key), json={"prompt": ""})
    assert invalid.status_code == 422


async def test_every_series_the_dashboard_queries_is_exported(
    server: Served, loaded: LoadedModel
) -> None:
    await traffic(server, loaded)
    names = exported((await server.client.get("/metrics", headers=auth(ADMIN_KEY))).text)
    queried = {name for expr in dashboard_exprs() for name in SERIES.findall(expr)}
    assert len(queried) >= 10
    missing = sorted(queried - set(names))
    assert not missing, f"the dashboard queries series /metrics does not export: {missing}"


async def test_errors_are_counted_by_type(server: Served, loaded: LoadedModel) -> None:
    await traffic(server, loaded)
    names = exported((await server.client.get("/metrics", headers=auth(ADMIN_KEY))).text)
    labels = names["prefix_serve_request_errors_total"]
    types = {dict(label)["type"] for label in labels}
    assert {"not_found", "validation_error"} <= types
    assert all(dict(label)["route"] == "/generate" for label in labels)


def test_the_dashboard_covers_what_operators_watch() -> None:
    exprs = " ".join(dashboard_exprs())
    for needle in ("generated_tokens_total", "time_to_first_token_seconds_bucket",
                   "inter_token_latency_seconds_bucket", "queued_requests", "kv_",
                   "prefix_cache_hits_total", "request_errors_total"):
        assert needle in exprs, needle
    assert exprs.count("histogram_quantile(0.99") >= 2  # p99 of TTFT and of ITL
