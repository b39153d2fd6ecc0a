"""Nothing heavy runs on the event loop: over-long lists are refused by their length before they
are validated item by item, and prompts are tokenized in a pool where one tenant's long prompts
queue behind each other, not in front of another tenant's.

The app runs under a real uvicorn on loopback, so `/health` answers from the same event loop that
parses the attackers' bodies.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from server.models.loader import LoadedModel, load_model
from tests.api.conftest import SettingsFactory
from tests.api.helpers import ADMIN_KEY, auth
from tests.api.live import live_server

MILLION_IDS = "[" + ",".join("0" for _ in range(1_000_000)) + "]"  # 1.9 MiB of JSON


def _completion_body(model: str, ids: str) -> bytes:
    head = json.dumps({"model": model, "max_tokens": 1})[:-1]
    return f'{head}, "prompt": {ids}}}'.encode()


async def _health_latencies(client: httpx.AsyncClient, stop: asyncio.Event) -> list[float]:
    latencies = []
    while not stop.is_set():
        started = time.perf_counter()
        response = await client.get("/health")
        latencies.append(time.perf_counter() - started)
        assert response.status_code == 200
        await asyncio.sleep(0.02)
    return latencies


async def test_a_million_token_ids_are_refused_by_their_count(
    make_settings: SettingsFactory, loaded: LoadedModel
) -> None:
    """Four clients sending a million token ids each, twice: each is refused by the list's
    length (the error names it), and /health keeps answering. Before, each body was validated
    and copied id by id (about 1.5 s of the loop each), and /health waited seconds."""
    with live_server(make_settings(), loaded) as live:
        async with httpx.AsyncClient(base_url=live.url, timeout=120) as client:
            body = _completion_body(loaded.name, MILLION_IDS)
            headers = {**auth(ADMIN_KEY), "content-type": "application/json"}
            stop = asyncio.Event()
            probe = asyncio.ensure_future(_health_latencies(client, stop))

            async def attacker() -> list[httpx.Response]:
                return [await client.post("/v1/completions", content=body, headers=headers)
                        for _ in range(2)]

            results = await asyncio.gather(*(attacker() for _ in range(4)))
            stop.set()
            latencies = await probe
    responses = [r for batch in results for r in batch]
    assert [r.status_code for r in responses] == [400] * 8
    for response in responses:
        error = response.json()["error"]
        assert error["type"] == "context_length_exceeded"
        assert "prompt has 1000000 items" in error["message"]
    assert len(latencies) >= 2
    # Generous for a loaded 2-core machine (the client shares this process): what is left is the
    # JSON parse, ~0.1 s per body; before, each body held the loop ~1.5 s (8 queued: ~10 s).
    assert max(latencies) < 4.0, latencies


async def test_messages_beyond_the_context_are_refused_by_their_count(
    make_settings: SettingsFactory, loaded: LoadedModel
) -> None:
    with live_server(make_settings(), loaded) as live:
        messages = [{"role": "user", "content": "hi"}] * (loaded.max_context + 1)
        response = httpx.post(f"{live.url}/v1/chat/completions", headers=auth(ADMIN_KEY),
                              json={"model": loaded.name, "messages": messages}, timeout=60)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "context_length_exceeded"
    assert "messages has" in response.json()["error"]["message"]


@pytest.fixture
def long_token_model(tiny_model_dir: Callable[..., Path]) -> LoadedModel:
    """The tiny model whose vocabulary holds one 50,000-byte entry, as real vocabularies hold
    long runs: the byte-length bound then lets a 300 KB prompt through to the tokenizer (its
    token count is only known by tokenizing it, about a second here)."""
    loaded = load_model(str(tiny_model_dir("llama")), dtype="float32")
    loaded.tokenizer.add_tokens(["z" * 50_000])
    return loaded


async def test_a_tenants_long_prompts_queue_behind_each_other_not_before_others(
    make_settings: SettingsFactory, long_token_model: LoadedModel
) -> None:
    """Tenant `heavy` sends six 300 KB prompts, then tenant `light` sends "hi there": light's
    answer comes before heavy's third (whatever the machine's speed: heavy's prompts take their
    turns one at a time, light's short one takes the other thread). Before, one tokenizer thread
    served them in arrival order, so light waited for all six."""
    loaded = long_token_model
    long_prompt = "the quick brown fox jumps " * 12_000  # 312 KB, about 1 s to tokenize
    with live_server(make_settings(tokenizer_threads=2), loaded) as live:
        async with httpx.AsyncClient(base_url=live.url, timeout=120) as client:
            keys = {}
            for name in ("heavy", "light"):
                created = await client.post("/admin/tenants", headers=auth(ADMIN_KEY),
                                            json={"name": name})
                keys[name] = created.json()["api_key"]
            finished: list[str] = []

            async def send(tenant: str, prompt: str) -> httpx.Response:
                response = await client.post("/v1/completions", headers=auth(keys[tenant]), json={
                    "model": loaded.name, "prompt": prompt, "max_tokens": 1})
                finished.append(tenant)
                return response

            heavy = [asyncio.ensure_future(send("heavy", long_prompt)) for _ in range(6)]
            await asyncio.sleep(0.1)  # all six are queued by now
            light = await send("light", "hi there")
            heavy_responses = await asyncio.gather(*heavy)
    assert light.status_code == 200, light.text
    # The long prompts tokenize to far more than the 256-token context: refused after counting.
    assert [r.json()["error"]["type"] for r in heavy_responses] == ["context_length_exceeded"] * 6
    assert finished.index("light") < 3, finished
