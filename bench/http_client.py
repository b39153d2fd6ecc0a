"""The HTTP benchmarks' load generator, in its own process so its work never shares the server's
or the baseline's interpreter.

Reads a spec as JSON on stdin (`bench.serving.client_spec`): the server's URL, a tenant key and
the requests. Sends them all at once as streamed greedy `/v1/completions` (token-id prompts,
`temperature` 0) with httpx, and optionally samples `/metrics` meanwhile. Writes JSON on stdout:
per request the send, first-text and end times, the arrival time of each text chunk (one chunk
per token with the bench model's tokenizer), the text and the completion tokens the server
reported; the metric samples; and the wall time from the first send to the last end.

    python -m bench.http_client < spec.json
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from typing import Any

import httpx


async def completion(client: httpx.AsyncClient, url: str, key: str,
                     request: dict[str, Any]) -> dict[str, Any]:
    body = {**request, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start, first, pieces, usage, times = time.perf_counter(), None, [], None, []
    headers = {"Authorization": f"Bearer {key}"}
    async with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as r:
        if r.status_code != 200:
            return {"error": f"{r.status_code} {(await r.aread()).decode()[:500]}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                return {"error": chunk["error"]}
            text = "".join(choice["text"] for choice in chunk.get("choices", []))
            if text:
                times.append(time.perf_counter())
                first = first or times[-1]
                pieces.append(text)
            usage = chunk.get("usage") or usage
    end = time.perf_counter()
    return {"start": start, "first": first, "end": end, "times": times, "text": "".join(pieces),
            "completion_tokens": (usage or {}).get("completion_tokens")}


async def sample_metrics(client: httpx.AsyncClient, url: str, every_s: float,
                         done: asyncio.Event, admin_key: str | None = None
                         ) -> list[dict[str, float]]:
    """`prefix_serve_*` metrics without labels, and the KV ones with theirs, every `every_s`
    until `done` (`/metrics` needs the operator key)."""
    samples = []
    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    while not done.is_set():
        try:
            text = (await client.get(f"{url}/metrics", headers=headers)).text
        except httpx.HTTPError:
            text = ""
        values = {"t": time.perf_counter()}
        for line in text.splitlines():
            name, _, value = line.rpartition(" ")
            if name.startswith("prefix_serve_") and ("{" not in name or "_kv" in name):
                values[name] = float(value)
        samples.append(values)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), every_s)
    return samples


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    requests = spec["requests"]
    limits = httpx.Limits(max_connections=len(requests) + 4, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=30), limits=limits) as client:
        done = asyncio.Event()
        every = spec.get("metrics_every_s")
        sampler = asyncio.create_task(sample_metrics(
            client, spec["url"], every, done, spec.get("admin_key"))) if every else None
        results = await asyncio.gather(*(completion(client, spec["url"], spec["key"], r)
                                         for r in requests))
        done.set()
        samples = await sampler if sampler else []
    ok = [r for r in results if "error" not in r]
    wall = max(r["end"] for r in ok) - min(r["start"] for r in ok) if ok else float("nan")
    return {"wall_s": wall, "requests": results, "metrics": samples}


def main() -> None:
    spec = json.load(sys.stdin)
    json.dump(asyncio.run(run(spec)), sys.stdout)


if __name__ == "__main__":
    main()
