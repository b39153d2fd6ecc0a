"""`/metrics` names every tenant (labels) with its request and token counts, so it is the
operator's: the main port's `/metrics` needs the operator key, and `--metrics-port` serves it
without a key on a listener of its own, on loopback unless told otherwise."""

from __future__ import annotations

from pathlib import Path

import httpx
import yaml

from server.models.loader import LoadedModel
from tests.api.conftest import Served, SettingsFactory, serve
from tests.api.helpers import ADMIN_KEY, auth, create_tenant
from tests.api.live import live_server


async def _a_tenant_with_traffic(server: Served) -> str:
    key = await create_tenant(server.client, "acme")
    response = await server.client.post("/generate", headers=auth(key),
                                        json={"prompt": "hello", "max_new_tokens": 2})
    assert response.status_code == 200
    return key


async def test_metrics_need_the_operator_key(server: Served) -> None:
    key = await _a_tenant_with_traffic(server)
    anonymous = await server.client.get("/metrics")
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["type"] == "authentication_error"
    assert "acme" not in anonymous.text and "tenant=" not in anonymous.text
    tenant = await server.client.get("/metrics", headers=auth(key))
    assert tenant.status_code == 403
    assert "tenant=" not in tenant.text
    operator = await server.client.get("/metrics", headers=auth(ADMIN_KEY))
    assert operator.status_code == 200
    assert 'tenant="acme"' in operator.text


async def test_the_metrics_port_serves_them_on_loopback_without_a_key(
    make_settings: SettingsFactory, loaded: LoadedModel
) -> None:
    async with serve(make_settings(metrics_port=0), loaded) as server:
        await _a_tenant_with_traffic(server)
        listener = server.app.state.metrics_listener
        assert listener.server.server_address[0] == "127.0.0.1"  # the default --metrics-host
        async with httpx.AsyncClient() as client:
            scraped = await client.get(f"http://127.0.0.1:{listener.port}/metrics")
        assert scraped.status_code == 200
        assert 'prefix_serve_requests_total{route="/generate",status="200",tenant="acme"}' in (
            scraped.text)
        assert (await server.client.get("/metrics")).status_code == 401  # main port: still keyed


def test_no_metrics_listener_unless_asked(make_settings: SettingsFactory,
                                          loaded: LoadedModel) -> None:
    with live_server(make_settings(), loaded) as live:
        assert live.app.state.metrics_listener is None
        assert httpx.get(f"{live.url}/metrics").status_code == 401


def test_the_compose_prometheus_scrapes_with_the_operator_key() -> None:
    """The observability profile keeps working: Prometheus sends the operator key, read from
    a compose secret that holds PREFIX_SERVE_ADMIN_KEY."""
    root = Path(__file__).resolve().parents[2]
    compose = yaml.safe_load((root / "docker-compose.yml").read_text())
    scrape = yaml.safe_load((root / "deploy/prometheus.yml").read_text())["scrape_configs"][0]
    secret = compose["secrets"]["prefix_serve_admin_key"]
    assert secret == {"environment": "PREFIX_SERVE_ADMIN_KEY"}
    assert "prefix_serve_admin_key" in compose["services"]["prometheus"]["secrets"]
    assert scrape["authorization"] == {
        "type": "Bearer", "credentials_file": "/run/secrets/prefix_serve_admin_key"}
