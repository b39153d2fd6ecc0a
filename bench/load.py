"""Load against a running prefix-serve: bursts of concurrent streamed generations from several
tenants over several prefixes, counting every status. The reliability suite
(`tests/reliability/`) runs it small in CI; run it by hand at any scale:

    python -m bench.load --url http://127.0.0.1:8000 --admin-key "$KEY" --model-dir DIR \
        --requests 5000 --concurrency 1000 --tenants 8 --prefixes 4

It creates its tenants (`load-<run>-<i>`) and their prefixes through the admin API (random
p_theta of the served model's shape, read from `--model-dir`'s config.json), then fires
`--requests` streamed `/generate` calls, at most `--concurrency` at once (all at once by default:
a cold burst), and prints the statuses, the 5xx count, latency percentiles and the tokens/s;
`--json PATH` writes them. Add `--delete` to delete its tenants afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import secrets
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
from safetensors.numpy import save

TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Target:
    url: str
    admin_key: str


@dataclass(frozen=True)
class Tenant:
    name: str
    key: str
    prefixes: tuple[str, ...]


@dataclass
class LoadReport:
    requests: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)  # error types, and client exceptions
    latencies_s: list[float] = field(default_factory=list)
    completed_streams: int = 0  # streams that ended with a `done` event
    tokens: int = 0
    wall_s: float = 0.0

    @property
    def server_errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status >= 500)

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies_s) or [0.0]
        return {
            "requests": self.requests, "statuses": dict(sorted(self.statuses.items())),
            "5xx": self.server_errors, "errors": dict(self.errors),
            "completed_streams": self.completed_streams, "tokens": self.tokens,
            "wall_s": round(self.wall_s, 3),
            "latency_p50_s": round(statistics.median(lat), 3),
            "latency_p99_s": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 3),
            "tokens_per_s": round(self.tokens / self.wall_s, 1) if self.wall_s else 0.0,
        }


def p_theta_file(num_layers: int, prefix_len: int, hidden: int, seed: int) -> bytes:
    """A random seed-form prefix [num_layers, prefix_len, hidden] as safetensors bytes."""
    rng = np.random.default_rng(seed)
    return save({"p_theta": rng.normal(0, 0.5, (num_layers, prefix_len, hidden))
                 .astype(np.float32)})


async def setup_tenants(
    client: httpx.AsyncClient, target: Target, shape: tuple[int, int], *, tenants: int,
    prefixes: int, run: str | None = None, prefix_len: int = 8,
) -> list[Tenant]:
    """Create `tenants` tenants with `prefixes` prefixes each (as the operator, so no tenant key
    is used before the load: a cold auth cache). `shape` = (num_layers, hidden_size)."""
    run = run or secrets.token_hex(3)
    made = []
    admin = {"Authorization": f"Bearer {target.admin_key}"}
    for i in range(tenants):
        name = f"load-{run}-{i}"
        created = await client.post(f"{target.url}/admin/tenants", headers=admin,
                                    json={"name": name})
        created.raise_for_status()
        names = tuple(f"p{j}" for j in range(prefixes))
        for j, prefix in enumerate(names):
            data = p_theta_file(shape[0], prefix_len, shape[1], seed=i * 1000 + j)
            files = {"file": ("p.safetensors", io.BytesIO(data), "application/octet-stream")}
            uploaded = await client.post(f"{target.url}/admin/prefixes", headers=admin,
                                         data={"name": prefix, "tenant": name}, files=files)
            uploaded.raise_for_status()
        made.append(Tenant(name, created.json()["api_key"], names))
    return made


async def burst(
    client: httpx.AsyncClient, url: str, tenants: Sequence[Tenant], *, requests: int,
    concurrency: int | None = None, max_new_tokens: int = 8,
) -> LoadReport:
    """`requests` streamed generations, round-robin over tenants, their prefixes and the base
    model, at most `concurrency` at once (None: all at once)."""
    report = LoadReport(requests=requests)
    gate = asyncio.Semaphore(concurrency or requests)

    async def one(i: int) -> None:
        tenant = tenants[i % len(tenants)]
        choices = [*tenant.prefixes, None]
        body = {"prompt": f"request {i}: once upon a time", "max_new_tokens": max_new_tokens,
                "stream": True, "prefix_id": choices[i % len(choices)]}
        async with gate:
            await _stream_one(client, url, tenant.key, body, report)

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(requests)))
    report.wall_s = time.perf_counter() - started
    return report


async def _stream_one(client: httpx.AsyncClient, url: str, key: str, body: dict[str, Any],
                      report: LoadReport) -> None:
    started = time.perf_counter()
    try:
        async with client.stream("POST", f"{url}/generate", json=body,
                                 headers={"Authorization": f"Bearer {key}"}) as response:
            report.statuses[response.status_code] += 1
            if response.status_code != 200:
                payload = json.loads(await response.aread())
                report.errors[payload.get("error", {}).get("type", "?")] += 1
                return
            event = ""
            async for line in response.aiter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:") and event == "done":
                    report.completed_streams += 1
                    report.tokens += json.loads(line[5:])["usage"]["completion_tokens"]
                elif line.startswith("data:") and event == "error":
                    report.errors[json.loads(line[5:])["error"]["type"]] += 1
    except httpx.HTTPError as exc:
        report.errors[type(exc).__name__] += 1
    finally:
        report.latencies_s.append(time.perf_counter() - started)


def model_shape(model_dir: str) -> tuple[int, int]:
    """(num_layers, hidden_size) from a Hugging Face model directory's config.json."""
    with open(f"{model_dir}/config.json") as f:
        config = json.load(f)
    layers = config.get("num_hidden_layers", config.get("n_layer"))
    hidden = config.get("hidden_size", config.get("n_embd"))
    return int(layers), int(hidden)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    target = Target(args.url.rstrip("/"), args.admin_key)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=TIMEOUT_S, limits=limits) as client:
        shape = model_shape(args.model_dir)
        tenants = await setup_tenants(client, target, shape, tenants=args.tenants,
                                      prefixes=args.prefixes)
    # A fresh client for the burst: no keep-alive connection the server may be closing.
    async with httpx.AsyncClient(timeout=TIMEOUT_S, limits=limits) as client:
        try:
            report = await burst(client, target.url, tenants, requests=args.requests,
                                 concurrency=args.concurrency,
                                 max_new_tokens=args.max_new_tokens)
        finally:
            if args.delete:
                for tenant in tenants:
                    await client.delete(f"{target.url}/admin/tenants/{tenant.name}",
                                        headers={"Authorization": f"Bearer {args.admin_key}"})
    return {"config": vars(args) | {"admin_key": "***"}, **report.summary()}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--admin-key", required=True)
    parser.add_argument("--model-dir", required=True,
                        help="the served model's directory (its config.json gives the shape)")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=None, help="default: all at once")
    parser.add_argument("--tenants", type=int, default=4)
    parser.add_argument("--prefixes", type=int, default=2, help="per tenant")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--delete", action="store_true", help="delete the tenants afterwards")
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args(argv)
    result = asyncio.run(main_async(args))
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=2)


if __name__ == "__main__":
    main()
