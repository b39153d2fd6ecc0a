"""The fairness bench's load generator, in its own process: a flooding tenant and a light one.

Reads a spec as JSON on stdin (`bench.fairness.load_spec`): the server's URL, each tenant's key
and its requests (streamed greedy `/v1/completions`, `bench.http_client.completion`). Three
phases:
1. `alone`: the light tenant's requests one after the other on an idle server;
2. the flood: `flood_concurrency` requests of the flood tenant in flight at all times (each
   worker sends its next as its last ends), until `warmup` of them have finished;
3. `light`: the light tenant's requests one after the other beside the flood; then the flood's
   workers stop after the request they have in flight.
`/metrics` is sampled meanwhile. Writes JSON on stdout: every request (its tenant and phase,
send, first-text and end times, each chunk's arrival), the metric samples, and the light
phase's span (`window`: first send, last end).

    python -m bench.tenant_load < spec.json
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import httpx

from bench.http_client import completion, sample_metrics


async def one_by_one(client: httpx.AsyncClient, url: str, key: str,
                     requests: list[dict[str, Any]], phase: str) -> list[dict[str, Any]]:
    """Each request after the previous one has ended."""
    done = []
    for request in requests:
        result = await completion(client, url, key, request)
        done.append({**result, "tenant": "light", "phase": phase,
                     "max_tokens": request["max_tokens"]})
    return done


async def flood_worker(client: httpx.AsyncClient, url: str, key: str,
                       requests: list[dict[str, Any]], stop: asyncio.Event,
                       done: list[dict[str, Any]]) -> None:
    """Send the flood's requests in turn (cycling) until `stop` or a failure."""
    i = 0
    while not stop.is_set():
        request = requests[i % len(requests)]
        result = await completion(client, url, key, request)
        done.append({**result, "tenant": "flood", "phase": "flood",
                     "max_tokens": request["max_tokens"]})
        if "error" in result:
            return
        i += 1


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    url, keys, concurrency = spec["url"], spec["keys"], spec["flood_concurrency"]
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600, connect=30), limits=limits) as client:
        sampling = asyncio.Event()
        sampler = asyncio.create_task(sample_metrics(client, url, spec["metrics_every_s"],
                                                     sampling, spec.get("admin_key")))
        alone = await one_by_one(client, url, keys["light"],
                                 spec["light"][: spec["alone_requests"]], "alone")
        stop, flood = asyncio.Event(), []
        workers = [asyncio.create_task(flood_worker(
            client, url, keys["flood"], spec["flood"][i::concurrency], stop, flood))
            for i in range(concurrency)]
        while len(flood) < spec["warmup"] and not any(w.done() for w in workers):
            await asyncio.sleep(0.05)
        light = await one_by_one(client, url, keys["light"], spec["light"], "light")
        stop.set()
        await asyncio.gather(*workers)
        sampling.set()
        samples = await sampler
    ok = [r for r in light if "error" not in r]
    window = [min(r["start"] for r in ok), max(r["end"] for r in ok)] if ok else None
    return {"requests": alone + light + flood, "metrics": samples, "window": window}


def main() -> None:
    spec = json.load(sys.stdin)
    json.dump(asyncio.run(run(spec)), sys.stdout)


if __name__ == "__main__":
    main()
