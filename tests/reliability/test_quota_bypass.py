"""Quota bypass attempts against two real `prefix-serve` processes sharing one Redis: a tenant
with 2,000 tokens per minute opens streams with long prompts and hangs up after the first delta,
and another tenant fires a concurrent burst. Figures: tokens charged vs tokens used, accepted
requests vs what the quota allows, and the overshoot factor.

Before the reservation, a stream closed after its first delta was charged one token (its prompt
never), so the first tenant used tens of times its quota; the burst was admitted whole (each
request was admitted while one token was left). Now the quota is exceeded by at most one
request's reservation, across both servers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from prefix_registry.redis_keys import Keys
from tests.redis_ns import REDIS_URL
from tests.reliability.conftest import record
from tests.reliability.procs import ADMIN_KEY, ServerProcess

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
PER_MINUTE = 2000
PROMPT = "hello world " * 20  # the part that used to go uncharged
PROMPT_TOKENS = 140  # of PROMPT, with the tiny model's tokenizer
MAX_NEW = 100
HANG_UPS_S = 20.0  # how long the hang-up attack runs (the 20 s)
NAMESPACE = f"quota-bypass-{time.time_ns()}:"


@pytest.fixture(scope="module")
def servers(model_dir: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[list[ServerProcess]]:
    """Two servers on one Redis namespace (as behind a load balancer)."""
    namespace = NAMESPACE
    flags = ["--redis-url", REDIS_URL, "--namespace", namespace, "--max-batch-size", "8"]
    processes = [ServerProcess(model_dir, tmp_path_factory.mktemp("quota"), flags)
                 for _ in range(2)]
    try:
        for process in processes:
            process.start()
        yield processes
    finally:
        for process in processes:
            process.stop()
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"{namespace}*"))
        if keys:
            client.delete(*keys)
        client.close()


async def _tenant(client: httpx.AsyncClient, url: str, name: str) -> str:
    created = await client.post(f"{url}/admin/tenants", headers=ADMIN, json={"name": name})
    assert created.status_code == 201, created.text
    quota = await client.patch(f"{url}/admin/tenants/{name}/quota", headers=ADMIN,
                               json={"tokens_per_minute": PER_MINUTE})
    assert quota.status_code == 200, quota.text
    return str(created.json()["api_key"])


async def _used(client: httpx.AsyncClient, servers: list[ServerProcess], tenant: str) -> int:
    """Prompt + generated tokens of `tenant` in both servers' metrics (what the engines did)."""
    total = 0.0
    for server in servers:
        text = (await client.get(f"{server.url}/metrics", headers=ADMIN)).text
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name in ("prefix_serve_prompt_tokens_total",
                              "prefix_serve_generated_tokens_total") and \
                        s.labels.get("tenant") == tenant:
                    total += s.value
    return int(total)


async def _settled(client: httpx.AsyncClient, servers: list[ServerProcess]) -> None:
    """Until both engines are idle (hung-up requests cancelled and accounted)."""
    for _ in range(600):
        busy = 0.0
        for server in servers:
            text = (await client.get(f"{server.url}/metrics", headers=ADMIN)).text
            for family in text_string_to_metric_families(text):
                for s in family.samples:
                    if s.name in ("prefix_serve_running_requests", "prefix_serve_queued_requests"):
                        busy += s.value
        if busy == 0:
            await asyncio.sleep(0.5)  # the background readers settle right after
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the engines did not go idle")


async def _hang_up_after_first_delta(client: httpx.AsyncClient, url: str, key: str) -> int:
    body = {"prompt": PROMPT, "max_new_tokens": MAX_NEW, "stream": True}
    async with client.stream("POST", f"{url}/generate", json=body,
                             headers={"Authorization": f"Bearer {key}"}) as response:
        if response.status_code != 200:
            await response.aread()
            return response.status_code
        async for line in response.aiter_lines():
            if line.startswith("event: delta"):
                break
    return 200


def _charged(tenant: str, seconds: float) -> int:
    """Tokens taken from `tenant`'s shared bucket over `seconds` since it was first used: one
    minute's tokens plus the refill, less what is left (read in Redis, on the Redis clock)."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        key = f"{Keys(NAMESPACE).tenant(tenant)}tokens-per-minute"
        saved = client.hmget(key, "level", "at")
        now_s, now_us = client.time()
    finally:
        client.close()
    if saved[0] is None:
        return 0  # nothing was taken from a shared bucket
    level, at = (float(x) for x in saved)  # type: ignore[arg-type]
    level = min(PER_MINUTE, level + (now_s + now_us / 1e6 - at) * PER_MINUTE / 60)
    return round(_allowed(seconds) - level)


def _allowed(seconds: float) -> float:
    """What the quota allows over `seconds`: one minute's tokens plus the refill."""
    return PER_MINUTE * (1 + seconds / 60)


async def test_streams_closed_after_the_first_delta_are_charged(
    servers: list[ServerProcess]
) -> None:
    async with httpx.AsyncClient(timeout=120) as client:
        key = await _tenant(client, servers[0].url, "hangup")
        started = time.monotonic()
        statuses: list[int] = []
        while time.monotonic() - started < HANG_UPS_S:
            url = servers[len(statuses) % 2].url  # alternate: one bucket for both servers
            statuses.append(await _hang_up_after_first_delta(client, url, key))
        elapsed = time.monotonic() - started
        await _settled(client, servers)
        in_metrics = await _used(client, servers, "hangup")
        charged = _charged("hangup", time.monotonic() - started)
    accepted = statuses.count(200)
    assert set(statuses) <= {200, 429}, statuses
    # Every accepted request computed its prompt at least, whatever the metrics saw.
    used = max(in_metrics, accepted * PROMPT_TOKENS)
    reservation = PROMPT_TOKENS + 10 + MAX_NEW
    overshoot = used / _allowed(elapsed)
    record("quota bypass: streams closed after the first delta", attempts=len(statuses),
           accepted=accepted, seconds=round(elapsed, 1), tokens_used=used,
           tokens_in_metrics=in_metrics, tokens_charged=charged,
           tokens_allowed=round(_allowed(elapsed)), overshoot=round(overshoot, 2))
    assert used <= _allowed(elapsed) + reservation, (used, accepted)
    assert statuses.count(429) > 0  # the quota stopped the attack
    assert in_metrics == used  # the per-tenant metrics count hung-up streams too
    assert abs(charged - used) <= PER_MINUTE / 60 * 2, (charged, used)  # the refill's blur


async def test_a_concurrent_burst_overshoots_by_at_most_one_reservation(
    servers: list[ServerProcess]
) -> None:
    async with httpx.AsyncClient(timeout=120) as client:
        key = await _tenant(client, servers[0].url, "burst")
        body = {"prompt": "hello world", "max_new_tokens": MAX_NEW}
        headers = {"Authorization": f"Bearer {key}"}
        started = time.monotonic()
        responses = await asyncio.gather(*(
            client.post(f"{servers[i % 2].url}/generate", headers=headers, json=body)
            for i in range(40)))
        elapsed = time.monotonic() - started
        await _settled(client, servers)
        used = await _used(client, servers, "burst")
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, [r.text for r in responses if r.status_code != 200]
    accepted = statuses.count(200)
    reservation = 10 + MAX_NEW  # "hello world" is a few tokens
    fits = int(_allowed(elapsed) // MAX_NEW)  # what the quota allows, at MAX_NEW each at least
    overshoot = used / _allowed(elapsed)
    record("quota bypass: 40 concurrent requests", accepted=accepted, quota_allows=fits,
           seconds=round(elapsed, 1), tokens_used=used, tokens_allowed=round(_allowed(elapsed)),
           overshoot=round(overshoot, 2))
    assert accepted <= fits + 1, statuses
    assert used <= _allowed(elapsed) + reservation
