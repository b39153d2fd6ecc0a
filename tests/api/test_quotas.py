"""Tenant quotas through the real app: set and read them, what reaches the engine, tokens per
minute, storage quotas at upload, the per-tenant queue cap, per-tenant metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from prefix_registry.redis_store import RedisStore
from server.api.metrics import EngineCollector
from server.engine.request import EngineRequest, TenantShare
from server.models.loader import LoadedModel
from tests.api.conftest import Served, SettingsFactory, serve
from tests.api.helpers import (
    ADMIN_KEY,
    auth,
    create_tenant,
    prefix_tensors,
    safetensors_file,
    upload,
)
from tests.api.test_errors import assert_error
from tests.api.test_observability import samples
from tests.redis_ns import REDIS_URL
from tests.registry.test_store_contract import _until

LONG = {"prompt": "hello world", "max_new_tokens": 240, "stream": True}  # runs for a while


def quota_path(tenant: str) -> str:
    return f"/admin/tenants/{tenant}/quota"


async def patch(client: httpx.AsyncClient, tenant: str, **fields: Any) -> httpx.Response:
    return await client.patch(quota_path(tenant), headers=auth(ADMIN_KEY), json=fields)


def spy_submits(served: Served) -> list[EngineRequest]:
    """Record what the API hands the real engine (the engine still runs every request)."""
    engine, seen = served.services.engine, []
    real_submit = engine.submit

    def submit(spec: EngineRequest) -> Any:
        seen.append(spec)
        return real_submit(spec)

    engine.submit = submit  # type: ignore[method-assign]
    return seen


# --- the quota routes ---------------------------------------------------------------------------


async def test_operator_sets_and_clears_quota_fields(make_settings: SettingsFactory,
                                                     loaded: LoadedModel) -> None:
    settings = make_settings(tenant_max_running=4, tenant_tokens_per_minute=50_000)
    async with serve(settings, loaded) as served:
        client = served.client
        key = await create_tenant(client, "acme")
        got = await client.get(quota_path("acme"), headers=auth(ADMIN_KEY))
        assert got.status_code == 200, got.text
        assert got.json() == {
            "name": "acme", "overrides": {}, "usage": {"prefixes": 0, "stored_bytes": 0},
            "quota": {"weight": 1.0, "max_running": 4, "max_queued": None,
                      "tokens_per_minute": 50_000, "max_prefixes": None,
                      "max_stored_bytes": None},
        }
        changed = await patch(client, "acme", weight=2.5, max_queued=3, max_running=None)
        assert changed.status_code == 200, changed.text
        assert changed.json()["overrides"] == {"weight": 2.5, "max_queued": 3}
        assert changed.json()["quota"]["max_running"] == 4  # null: the server's default
        cleared = await patch(client, "acme", weight=None)
        assert cleared.json()["overrides"] == {"max_queued": 3}
        assert cleared.json()["quota"]["weight"] == 1.0
        own = await client.get(quota_path("acme"), headers=auth(key))  # a tenant reads its own
        assert own.status_code == 200 and own.json()["quota"]["max_queued"] == 3


async def test_quota_routes_refuse_bad_calls(server: Served) -> None:
    client = server.client
    key = await create_tenant(client, "acme")
    await create_tenant(client, "beta")
    assert_error(await client.get(quota_path("beta"), headers=auth(key)), 403,
                 "permission_denied")
    assert_error(await client.patch(quota_path("acme"), headers=auth(key), json={"weight": 9}),
                 403, "permission_denied")
    assert_error(await client.get(quota_path("acme")), 401, "authentication_error")
    assert_error(await patch(client, "ghost", weight=2), 404, "not_found")
    assert_error(await client.get(quota_path("ghost"), headers=auth(ADMIN_KEY)), 404,
                 "not_found")
    for bad in ({"weight": 0}, {"weight": 1e9}, {"max_running": 1.5}, {"max_queued": 0},
                {"colour": 2}, {"tokens_per_minute": -5}, {"max_stored_bytes": 2**60}):
        response = await patch(client, "acme", **bad)
        assert_error(response, 422, "validation_error")
    response = await client.patch(quota_path("acme"), headers=auth(ADMIN_KEY),
                                  content=b'{"weight": NaN}')
    assert_error(response, 422, "validation_error")
    assert (await server.services.store.get_quota("acme")).to_dict() == {}


# --- what reaches the engine --------------------------------------------------------------------


async def test_requests_carry_the_tenant_share_without_a_registry_read_each(
    make_settings: SettingsFactory, loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the PATCH's own announcement has come back over pub/sub, requests use the cached
    quota: at most one registry read for five requests, not one each. The announcement may come
    before the PATCH's `remember()` (no read) or after it (it expires the entry: one read of the
    same quota); both are right. The TTL is long, so a slow machine does not expire it."""
    async with serve(make_settings(tenant_quota_ttl_s=3600), loaded) as server:
        client, store = server.client, server.services.store
        key = await create_tenant(client, "acme")
        announced = asyncio.Event()
        # Subscribers are called in the order they subscribed: the server's cache came first.
        own = await store.subscribe(lambda tenant, name: None, on_quota=lambda t: announced.set())
        try:
            await patch(client, "acme", weight=3, max_running=2, max_queued=5)
            await asyncio.wait_for(announced.wait(), timeout=60)
        finally:
            own.close()
        reads = []
        real_get_quota = store.get_quota

        async def counted(tenant: str) -> Any:
            reads.append(tenant)
            return await real_get_quota(tenant)

        monkeypatch.setattr(store, "get_quota", counted)
        seen = spy_submits(server)
        body = {"prompt": "hello world", "max_new_tokens": 2}
        for _ in range(5):
            response = await client.post("/generate", headers=auth(key), json=body)
            assert response.status_code == 200
        assert [s.tenant for s in seen] == [TenantShare("acme", 3.0, 2, 5)] * 5
        assert reads in ([], ["acme"])  # at most once, after the announcement


async def _weight_changed_elsewhere(
    served: Served, namespace: str
) -> tuple[Callable[[], Awaitable[object]], list[EngineRequest]]:
    """Tenant acme generates once, then another server's registry client sets its weight to 4.
    Returns a call that generates again, and the requests the engine was given."""
    key = await create_tenant(served.client, "acme")
    seen = spy_submits(served)
    body = {"prompt": "hello world", "max_new_tokens": 1}

    def generate() -> Awaitable[object]:
        return served.client.post("/generate", headers=auth(key), json=body)

    await generate()
    other = RedisStore(REDIS_URL, namespace=namespace)
    try:
        await other.update_quota("acme", {"weight": 4})
    finally:
        await other.close()
    return generate, seen


async def test_a_change_made_elsewhere_applies_within_the_ttl(
    make_settings: SettingsFactory, loaded: LoadedModel, namespace: str
) -> None:
    async with serve(make_settings(tenant_quota_ttl_s=0.2), loaded) as served:
        generate, seen = await _weight_changed_elsewhere(served, namespace)
        await asyncio.sleep(0.3)
        await generate()
        assert [s.tenant.weight for s in seen] == [1.0, 4.0]


async def test_a_change_made_elsewhere_is_announced_to_this_server_at_once(
    make_settings: SettingsFactory, loaded: LoadedModel, namespace: str
) -> None:
    async with serve(make_settings(tenant_quota_ttl_s=3600), loaded) as served:
        generate, seen = await _weight_changed_elsewhere(served, namespace)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 1.0  # the TTL is an hour: only the announcement can do it
        while seen[-1].tenant.weight != 4.0:
            assert loop.time() < deadline, "the quota change was not announced within 1 s"
            await generate()
        assert seen[0].tenant.weight == 1.0


# --- tokens per minute --------------------------------------------------------------------------


async def test_tokens_per_minute_limit_that_tenant_alone(server: Served) -> None:
    client = server.client
    acme = await create_tenant(client, "acme")
    beta = await create_tenant(client, "beta")
    await patch(client, "acme", tokens_per_minute=2)
    body = {"prompt": "hello world", "max_new_tokens": 4}
    first = await client.post("/generate", headers=auth(acme), json=body)
    assert first.status_code == 200  # admitted with tokens left; it uses more than 2
    refused = await client.post("/generate", headers=auth(acme), json=body)
    assert_error(refused, 429, "rate_limited")
    assert int(refused.headers["retry-after"]) >= 1
    streamed = await client.post("/generate", headers=auth(acme), json={**body, "stream": True})
    assert_error(streamed, 429, "rate_limited")  # refused before the stream starts
    openai = await client.post("/v1/completions", headers=auth(acme),
                               json={"model": server.services.model_name, "prompt": "hi"})
    assert openai.status_code == 429
    assert (await client.post("/generate", headers=auth(beta), json=body)).status_code == 200
    got = samples((await client.get("/metrics", headers=auth(ADMIN_KEY))).text)
    rejected = ("prefix_serve_rejected_requests_total",
                frozenset({("tenant", "acme"), ("reason", "rate_limited")}))
    assert got[rejected] == 3
    assert not any(name == rejected[0] and ("tenant", "beta") in labels
                   for name, labels in got)


# --- storage quotas at upload -------------------------------------------------------------------


async def test_uploads_stay_within_the_prefix_count_and_stored_bytes(
    make_settings: SettingsFactory, loaded: LoadedModel
) -> None:
    async with serve(make_settings(tenant_max_prefixes=2), loaded) as served:
        client = served.client
        key = await create_tenant(client, "acme")

        async def put(name: str, seed: int = 0, prefix_len: int = 4) -> httpx.Response:
            tensors = prefix_tensors(loaded, prefix_len=prefix_len, seed=seed)
            return await upload(client, key, name, {"p.safetensors": safetensors_file(tensors)})

        first = await put("a")
        assert first.status_code == 201 and (await put("b")).status_code == 201
        refused = await put("c")  # the server's default: 2 names
        assert_error(refused, 403, "quota_exceeded")
        assert "at most 2 prefixes" in refused.json()["error"]["message"]
        assert (await put("a", seed=1)).status_code == 201  # a new version is not a new prefix
        size = first.json()["size_bytes"]
        await patch(client, "acme", max_prefixes=3, max_stored_bytes=4 * size)
        assert (await put("c", seed=2)).status_code == 201  # 4 versions now: at the limit
        over = await put("a", seed=3)
        assert_error(over, 403, "quota_exceeded")
        assert f"at most {4 * size} bytes" in over.json()["error"]["message"]
        got = (await client.get(quota_path("acme"), headers=auth(key))).json()
        assert got["usage"] == {"prefixes": 3, "stored_bytes": 4 * size}
        cleared = (await patch(client, "acme", max_prefixes=None)).json()
        assert cleared["quota"]["max_prefixes"] == 2  # the server's default again
        other = await create_tenant(client, "beta")  # another tenant is not affected
        tensors = safetensors_file(prefix_tensors(loaded))
        assert (await upload(client, other, "x", {"p.safetensors": tensors})).status_code == 201


# --- the per-tenant caps (enforced by the engine) -----------------------------------------------


async def test_a_tenant_at_its_running_cap_leaves_free_slots_to_others(
    make_settings: SettingsFactory, loaded: LoadedModel
) -> None:
    """Two slots; acme may run one request at a time: its second waits although a slot is free,
    and beta's request takes that slot and finishes while acme's first still runs."""
    async with serve(make_settings(max_batch_size=2, max_queue=8), loaded) as served:
        client, engine = served.client, served.services.engine
        assert engine is not None
        acme = await create_tenant(client, "acme")
        beta = await create_tenant(client, "beta")
        await patch(client, "acme", max_running=1)
        first = asyncio.create_task(client.post("/generate", headers=auth(acme), json=LONG))
        await _until(lambda: engine.stats().running == 1, timeout=30)
        second = asyncio.create_task(client.post("/generate", headers=auth(acme), json=LONG))
        await _until(lambda: engine.stats().waiting == 1, timeout=30)
        await asyncio.sleep(0.2)  # steps go by: acme's second stays out of the free slot
        assert (engine.stats().running, engine.stats().waiting) == (1, 1)
        light = await client.post("/generate", headers=auth(beta),
                                  json={"prompt": "hi", "max_new_tokens": 2})
        assert light.status_code == 200
        assert not first.done() and not second.done()  # beta did not wait for acme's
        for task in (first, second):  # hanging up cancels them in the engine
            task.cancel()
        await asyncio.gather(first, second, return_exceptions=True)
        await _until(lambda: engine.stats().running + engine.stats().waiting == 0, timeout=30)




async def test_a_tenant_beyond_its_queue_cap_gets_429_and_others_are_served(
    make_settings: SettingsFactory, loaded: LoadedModel
) -> None:
    """acme may run one request and queue one: its third is refused, for acme alone, while
    beta's request takes the free slot and is served."""
    async with serve(make_settings(max_batch_size=2, max_queue=8), loaded) as served:
        client, engine = served.client, served.services.engine
        assert engine is not None
        acme = await create_tenant(client, "acme")
        beta = await create_tenant(client, "beta")
        await patch(client, "acme", max_running=1, max_queued=1)
        running = asyncio.create_task(client.post("/generate", headers=auth(acme), json=LONG))
        await _until(lambda: engine.stats().running == 1, timeout=30)
        waiting = asyncio.create_task(client.post("/generate", headers=auth(acme), json=LONG))
        await _until(lambda: engine.stats().waiting == 1, timeout=30)
        refused = await client.post("/generate", headers=auth(acme), json=LONG)
        light = await client.post("/generate", headers=auth(beta),
                                  json={"prompt": "hi", "max_new_tokens": 2})
        for task in (running, waiting):  # hanging up cancels them in the engine
            task.cancel()
        await asyncio.gather(running, waiting, return_exceptions=True)
        assert light.status_code == 200
        assert_error(refused, 429, "tenant_queue_full")
        assert int(refused.headers["retry-after"]) >= 1


# --- per-tenant metrics -------------------------------------------------------------------------


async def test_per_tenant_metrics(server: Served) -> None:
    client = server.client
    for tenant in ("acme", "beta"):
        key = await create_tenant(client, tenant)
        for _ in range(2 if tenant == "acme" else 1):
            response = await client.post("/generate", headers=auth(key),
                                         json={"prompt": "hello world", "max_new_tokens": 3})
            assert response.status_code == 200
    got = samples((await client.get("/metrics", headers=auth(ADMIN_KEY))).text)
    for tenant, count in (("acme", 2), ("beta", 1)):
        labels = frozenset({("tenant", tenant)})
        assert got[("prefix_serve_time_to_first_token_seconds_count", labels)] == count
        assert got[("prefix_serve_queue_time_seconds_count", labels)] == count
        assert got[("prefix_serve_generated_tokens_total", labels)] == 3 * count
        assert got[("prefix_serve_prompt_tokens_total", labels)] > 0
        assert got[("prefix_serve_tenant_service", labels)] > 0  # the engine's VTC counter


def test_the_service_counter_is_exported_for_known_tenants_only() -> None:
    """`EngineStats.tenant_service` (when the engine reports it) becomes one gauge per tenant
    that exists; names the server never saw, and the untracked "", are left out."""
    stats = {"running": 1, "tenant_service": {"acme": 12.5, "": 3.0, "ghost": 7.0}}
    collector = EngineCollector(lambda: stats, known=lambda t: t == "acme")
    families = {f.name: f for f in collector.collect()}
    service = families["prefix_serve_tenant_service"]
    assert [(s.labels, s.value) for s in service.samples] == [({"tenant": "acme"}, 12.5)]
    without = {f.name for f in EngineCollector(lambda: {"running": 1}, known=bool).collect()}
    assert "prefix_serve_tenant_service" not in without
