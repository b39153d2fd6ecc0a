"""Stalls vs `/health`: a real `prefix-serve` process under requests that used to stall its event
loop, with `/health` probed throughout.

- A million token ids per request, from four clients at once: refused by the list's length before
  the body is validated item by item.
- Prompts long enough to take a second each to tokenize (a 50,000-byte vocabulary entry lets them
  past the byte-length bound), from three clients of one tenant, while another tenant sends
  "hi there": the tokenizer pool serves tenants in turn.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import time
from pathlib import Path

import httpx
from transformers import AutoTokenizer

from tests.reliability.conftest import record
from tests.reliability.procs import ADMIN_KEY, prefix_serve

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
MILLION_IDS = "[" + ",".join("0" for _ in range(1_000_000)) + "]"  # 1.9 MiB of JSON
LONG_PROMPT = "the quick brown fox jumps " * 12_000  # 312 KB


def _own_store(tmp_path: Path) -> list[str]:
    return ["--data-dir", str(tmp_path / "store")]  # not the user's default directory


class HealthProbe:
    """GET /health every 50 ms until stopped; the latencies it saw."""

    def __init__(self, client: httpx.AsyncClient, url: str) -> None:
        self._client, self._url = client, url
        self._stop = asyncio.Event()
        self.latencies: list[float] = []
        self.failures = 0
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            response = await self._client.get(f"{self._url}/health")
            self.latencies.append(time.perf_counter() - started)
            self.failures += response.status_code != 200
            await asyncio.sleep(0.05)

    async def stop(self) -> dict[str, float]:
        self._stop.set()
        await self._task
        ordered = sorted(self.latencies)
        return {"health_probes": len(ordered), "health_failures": self.failures,
                "health_p50_s": round(statistics.median(ordered), 3),
                "health_p99_s": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 3),
                "health_max_s": round(ordered[-1], 3)}


async def test_million_token_ids_vs_health(model_dir: Path, tmp_path: Path) -> None:
    with prefix_serve(model_dir, tmp_path / "ids", _own_store(tmp_path)) as server:
        async with httpx.AsyncClient(timeout=120) as client:
            head = json.dumps({"model": str(model_dir), "max_tokens": 1})[:-1]
            body = f'{head}, "prompt": {MILLION_IDS}}}'.encode()
            headers = {**ADMIN, "content-type": "application/json"}
            probe = HealthProbe(client, server.url)
            started = time.perf_counter()

            async def attacker() -> list[int]:
                return [(await client.post(f"{server.url}/v1/completions", content=body,
                                           headers=headers)).status_code for _ in range(3)]

            statuses = [s for batch in await asyncio.gather(*(attacker() for _ in range(4)))
                        for s in batch]
            elapsed = time.perf_counter() - started
            figures = await probe.stop()
    record("stalls: 1M token ids x 4 clients", requests=len(statuses),
           refused_400=statuses.count(400), attack_s=round(elapsed, 2), **figures)
    assert statuses == [400] * 12
    assert figures["health_failures"] == 0
    # Generous on a loaded 2-core machine: the JSON parse (~0.1 s per body) is what is left on
    # the loop; the issue measured 3.2 s median before.
    assert figures["health_p99_s"] < 4.0


def _long_token_model(model_dir: Path, into: Path) -> Path:
    """A copy of the tiny model whose tokenizer holds one 50,000-byte entry."""
    shutil.copytree(model_dir, into)
    tokenizer = AutoTokenizer.from_pretrained(into)
    tokenizer.add_tokens(["z" * 50_000])
    tokenizer.save_pretrained(into)
    return into


async def test_long_prompts_of_one_tenant_vs_another_tenant(model_dir: Path,
                                                            tmp_path: Path) -> None:
    long_model = _long_token_model(model_dir, tmp_path / "long-token-model")
    flags = [*_own_store(tmp_path), "--tokenizer-threads", "2"]
    with prefix_serve(long_model, tmp_path / "tok", flags) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            keys = {}
            for name in ("heavy", "light"):
                created = await client.post("/admin/tenants", headers=ADMIN, json={"name": name})
                keys[name] = {"Authorization": f"Bearer {created.json()['api_key']}"}

            async def complete(tenant: str, prompt: str) -> tuple[int, float]:
                started = time.perf_counter()
                response = await client.post("/v1/completions", headers=keys[tenant], json={
                    "model": str(long_model), "prompt": prompt, "max_tokens": 1})
                return response.status_code, time.perf_counter() - started

            async def heavy() -> list[tuple[int, float]]:
                return [await complete("heavy", LONG_PROMPT) for _ in range(2)]

            probe = HealthProbe(client, server.url)
            flood = asyncio.gather(*(heavy() for _ in range(3)))
            await asyncio.sleep(0.5)
            light = [await complete("light", "hi there") for _ in range(5)]
            heavy_results = [r for batch in await flood for r in batch]
            figures = await probe.stop()
    light_s = [s for _, s in light]
    record("stalls: 312 KB prompts x 3 (one tenant) vs another's 'hi there'",
           heavy_requests=len(heavy_results),
           heavy_median_s=round(statistics.median(s for _, s in heavy_results), 2),
           light_requests=len(light), light_ok=sum(c == 200 for c, _ in light),
           light_median_s=round(statistics.median(light_s), 3),
           light_max_s=round(max(light_s), 3), **figures)
    assert [c for c, _ in light] == [200] * 5
    assert [c for c, _ in heavy_results] == [400] * 6  # too long for the context, once counted
    assert figures["health_failures"] == 0
    # Generous: light waits for no heavy prompt (before: for all three, 10.3 s in the issue).
    assert max(light_s) < statistics.median(s for _, s in heavy_results)
