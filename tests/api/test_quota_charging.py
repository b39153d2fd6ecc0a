"""Tokens per minute that hold: the reservation at admission, its settlement whatever happens to
the connection, on all three generation routes; the shared Redis buckets; corrupt quota records.

The HTTP tests run the real app under uvicorn on loopback (a client really hangs up) with the
limiter's clock frozen, so that no token refills during a test and the figures are exact.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from prometheus_client import generate_latest

from prefix_registry.redis_store import RedisStore
from prefix_registry.token_buckets import LocalTokenBuckets, RedisTokenBuckets
from server.api import engine_calls
from server.api.rate_limit import TokenRateLimiter
from server.errors import RateLimitedError
from server.models.loader import LoadedModel
from tests.api.conftest import SettingsFactory
from tests.api.helpers import ADMIN_KEY, auth
from tests.api.live import LiveServer, live_server, wait_for
from tests.api.test_observability import samples
from tests.engine.helpers import OnForward
from tests.redis_ns import REDIS_URL

ROUTES = ("/generate", "/v1/completions", "/v1/chat/completions")
PROMPT = "hello world"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def body_for(route: str, model: str, max_tokens: int, *, stream: bool) -> dict[str, Any]:
    if route == "/generate":
        return {"prompt": PROMPT, "max_new_tokens": max_tokens, "stream": stream}
    if route == "/v1/completions":
        return {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "stream": stream,
                "temperature": 0}
    return {"model": model, "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": max_tokens, "stream": stream, "temperature": 0}


@pytest.fixture
def live(make_settings: SettingsFactory, loaded: LoadedModel) -> Iterator[LiveServer]:
    with live_server(make_settings(max_batch_size=8, max_queue=64), loaded) as server:
        server.services.rate_limiter = TokenRateLimiter(clock=Clock())  # no refill
        yield server


def new_tenant(live: LiveServer, name: str, tokens_per_minute: int) -> str:
    created = httpx.post(f"{live.url}/admin/tenants", headers=auth(ADMIN_KEY), json={"name": name})
    assert created.status_code == 201, created.text
    quota = httpx.patch(f"{live.url}/admin/tenants/{name}/quota", headers=auth(ADMIN_KEY),
                        json={"tokens_per_minute": tokens_per_minute})
    assert quota.status_code == 200, quota.text
    return str(created.json()["api_key"])


def charged(live: LiveServer, tenant: str, per_minute: int) -> float:
    return per_minute - live.services.rate_limiter.local.level(tenant, per_minute)


def counted_tokens(live: LiveServer, tenant: str) -> tuple[float, float]:
    """(prompt, generated) tokens of `tenant` in the per-tenant metrics."""
    got = samples(generate_latest(live.services.metrics.registry).decode())
    labels = frozenset({("tenant", tenant)})
    return (got.get(("prefix_serve_prompt_tokens_total", labels), 0.0),
            got.get(("prefix_serve_generated_tokens_total", labels), 0.0))


def settled(live: LiveServer) -> None:
    """Wait until the engine is idle and every hung-up stream was read to its end."""
    engine = live.services.engine
    assert engine is not None
    wait_for(lambda: engine.stats().running + engine.stats().waiting == 0
             and not engine_calls._draining)


def slow_steps(live: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """10 ms per step: the client hangs up while its request is still generating."""
    engine = live.services.engine
    assert engine is not None
    monkeypatch.setattr(engine, "step_hook", OnForward(lambda work: time.sleep(0.01)))


def hang_up_after_first_delta(live: LiveServer, key: str, route: str) -> None:
    body = body_for(route, live.services.model_name, 200, stream=True)
    wanted = 2 if route.endswith("chat/completions") else 1  # chat starts with a role chunk
    with httpx.Client(base_url=live.url, timeout=30) as client, client.stream(
        "POST", route, headers=auth(key), json=body
    ) as response:
        assert response.status_code == 200, response.read()
        seen = 0
        for line in response.iter_lines():
            if line.startswith(("event: delta", "data: {")):
                seen += 1
                if seen == wanted:
                    break


# --- charging whatever happens to the connection ------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
def test_a_stream_closed_after_its_first_delta_is_charged_for_all_it_used(
    live: LiveServer, route: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: tokens per minute were charged as the route saw its events, so a client that hung
    up after the first delta paid one token, its prompt never, and the metrics saw nothing."""
    key = new_tenant(live, "acme", 100_000)
    slow_steps(live, monkeypatch)
    for _ in range(4):
        hang_up_after_first_delta(live, key, route)
    settled(live)
    prompt, generated = counted_tokens(live, "acme")
    assert prompt >= 4 * 2 and generated >= 4  # the per-tenant metrics count them too
    assert generated < 4 * 200  # they were cancelled, not run to the end
    assert charged(live, "acme", 100_000) == prompt + generated  # exactly what was used


@pytest.mark.parametrize("route", ROUTES)
def test_a_finished_request_is_charged_exactly_its_prompt_and_output(
    live: LiveServer, route: str
) -> None:
    key = new_tenant(live, "acme", 100_000)
    body = body_for(route, live.services.model_name, 5, stream=False)
    for _ in range(3):
        response = httpx.post(f"{live.url}{route}", headers=auth(key), json=body, timeout=60)
        assert response.status_code == 200, response.text
    settled(live)
    prompt, generated = counted_tokens(live, "acme")
    assert generated == 15
    assert charged(live, "acme", 100_000) == prompt + generated  # the unused part came back


# --- bounding a concurrent burst ----------------------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
async def test_a_concurrent_burst_is_admitted_only_while_its_reservations_fit(
    live: LiveServer, route: str
) -> None:
    """Before: each request was admitted while one token was left and paid when it finished,
    so 20 concurrent requests all ran against a quota that holds 3 of them."""
    per_minute, max_tokens = 200, 50
    key = new_tenant(live, "acme", per_minute)
    body = body_for(route, live.services.model_name, max_tokens, stream=False)
    async with httpx.AsyncClient(base_url=live.url, timeout=60) as client:
        responses = await asyncio.gather(
            *(client.post(route, headers=auth(key), json=body) for _ in range(20)))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, [r.text for r in responses if r.status_code != 200]
    accepted = statuses.count(200)
    assert 1 <= accepted <= per_minute // max_tokens  # each reserved more than max_tokens
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.json()["error"]["type"] == "rate_limited"
    assert int(refused.headers["retry-after"]) >= 1
    settled(live)
    prompt, generated = counted_tokens(live, "acme")
    assert charged(live, "acme", per_minute) == prompt + generated <= per_minute


def test_a_request_refused_by_the_engine_gives_its_reservation_back(
    make_settings: SettingsFactory, loaded: LoadedModel
) -> None:
    with live_server(make_settings(), loaded) as live:
        live.services.rate_limiter = TokenRateLimiter(clock=Clock())
        key = new_tenant(live, "acme", 100_000)
        body = {"prompt": PROMPT, "max_new_tokens": 5, "stream": False}
        engine = live.services.engine
        assert engine is not None
        engine.intake.close()  # the engine refuses everything now (503 shutting down)
        response = httpx.post(f"{live.url}/generate", headers=auth(key), json=body, timeout=60)
        assert response.status_code == 503, response.text
        assert charged(live, "acme", 100_000) == 0


# --- the buckets --------------------------------------------------------------------------------


async def test_local_buckets_reserve_refill_and_give_back() -> None:
    clock = Clock()
    buckets = LocalTokenBuckets(clock)
    assert (await buckets.take("acme", 60, 50)).granted  # a minute's worth to start with
    refused = await buckets.take("acme", 60, 20)  # 10 left: the whole reservation must fit
    assert not refused.granted and refused.level == 10
    assert refused.wait_s(20, 60) == pytest.approx(10.0)  # one token per second
    clock.now += 10
    assert (await buckets.take("acme", 60, 20)).granted
    await buckets.give("acme", 60, 15)  # unused: back in the bucket
    assert buckets.level("acme", 60) == 15
    clock.now += 3600
    assert buckets.level("acme", 60) == 60  # never more than a minute's worth
    assert (await buckets.take("acme", 60, 500)).granted  # larger than a minute: when full
    assert buckets.level("acme", 60) == -440
    assert not (await buckets.take("acme", 60, 1)).granted
    assert buckets.level("beta", 5) == 5  # each tenant its own bucket


async def test_the_limiter_refuses_with_a_retry_after_and_ignores_tenants_without_a_limit(
) -> None:
    clock = Clock()
    limiter = TokenRateLimiter(clock=clock)
    assert await limiter.reserve("acme", None, 10**9) is None
    reservation = await limiter.reserve("acme", 60, 60)
    assert reservation is not None
    with pytest.raises(RateLimitedError) as refused:
        await limiter.reserve("acme", 60, 30)
    assert refused.value.retry_after == pytest.approx(30.0)
    assert refused.value.status_code == 429 and refused.value.type == "rate_limited"
    await limiter.settle(reservation, 20)  # used 20 of 60
    assert limiter.local.level("acme", 60) == 40


async def test_redis_buckets_are_one_atomic_bucket_for_every_server(namespace: str) -> None:
    """Two stores (two servers' connection pools) race 24 reservations of 100 against 1,000 per
    minute: exactly 10 are granted (plus what refilled meanwhile), never one more."""
    stores = [RedisStore(REDIS_URL, namespace=namespace) for _ in range(2)]
    try:
        buckets = [store.token_buckets() for store in stores]
        for store in stores:  # connections first: 24 at once may not connect on a busy machine
            await asyncio.gather(*(store.ping() for _ in range(12)))
        started = time.monotonic()
        results = await asyncio.gather(
            *(buckets[i % 2].take("acme", 1000, 100) for i in range(24)))
        refill = (time.monotonic() - started) * 1000 / 60
        granted = sum(r.granted for r in results)
        assert 10 <= granted <= 10 + int(refill // 100)
        assert min(r.level for r in results) >= -1e-6  # never below zero
        await buckets[1].give("acme", 1000, 300)
        level = (await buckets[0].take("acme", 1000, 0)).level
        assert 300 <= level <= 300 + (time.monotonic() - started) * 1000 / 60 + 1
    finally:
        for store in stores:
            await store.close()


async def test_redis_buckets_match_the_local_rule(namespace: str) -> None:
    store = RedisStore(REDIS_URL, namespace=namespace)
    try:
        buckets: RedisTokenBuckets = store.token_buckets()
        assert (await buckets.take("acme", 60, 500)).granted  # larger than a minute: when full
        refused = await buckets.take("acme", 60, 1)
        assert not refused.granted and refused.level < -430
        assert (await buckets.take("beta", 60, 60)).granted  # each tenant its own bucket
    finally:
        await store.close()


# --- corrupt quota records ----------------------------------------------------------------------


def _generate_ok(live: LiveServer, key: str) -> None:
    for route in ROUTES:
        body = body_for(route, live.services.model_name, 2, stream=False)
        response = httpx.post(f"{live.url}{route}", headers=auth(key), json=body, timeout=60)
        assert response.status_code == 200, (route, response.text)


def test_a_quota_field_that_is_not_json_is_ignored_not_a_500(
    make_settings: SettingsFactory, loaded: LoadedModel, namespace: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before: `json.loads` of the stored field raised, and every generation of the tenant was a
    500. Now the bad field is logged with its key and counts as not set; the others apply."""
    with live_server(make_settings(tenant_quota_ttl_s=0.0), loaded) as live:
        key = new_tenant(live, "acme", 100_000)
        quota_key = RedisStore(REDIS_URL, namespace=namespace).keys.quota("acme")
        client = redis.Redis.from_url(REDIS_URL)
        client.hset(quota_key, mapping={"tokens_per_minute": "{not json", "max_running": "2",
                                        "weight": b"\xff\xfe"})
        live.services.quotas.expire("acme")
        _generate_ok(live, key)
        got = httpx.get(f"{live.url}/admin/tenants/acme/quota", headers=auth(ADMIN_KEY))
        assert got.status_code == 200, got.text
        assert got.json()["overrides"] == {"max_running": 2}
        assert quota_key in caplog.text and "not JSON" in caplog.text
        client.delete(quota_key)
        client.set(quota_key, "a string where a hash belongs")  # the wrong Redis type
        live.services.quotas.expire("acme")
        _generate_ok(live, key)
        client.close()


def test_a_local_quota_file_that_is_not_json_is_ignored_not_a_500(
    make_settings: SettingsFactory, loaded: LoadedModel, tmp_path: Path
) -> None:
    with live_server(make_settings(redis_url=None, data_dir=tmp_path / "data"), loaded) as live:
        key = new_tenant(live, "acme", 100_000)
        paths = list((tmp_path / "data").rglob("quota.json"))
        assert len(paths) == 1
        paths[0].write_bytes(b"{ not json")
        live.services.quotas.expire("acme")
        _generate_ok(live, key)
        got = httpx.get(f"{live.url}/admin/tenants/acme/quota", headers=auth(ADMIN_KEY))
        assert got.status_code == 200 and got.json()["overrides"] == {}
        paths[0].write_text(json.dumps(["a", "list"]))  # JSON, but not a record
        live.services.quotas.expire("acme")
        _generate_ok(live, key)
