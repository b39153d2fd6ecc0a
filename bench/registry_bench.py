"""Registry scale benchmark against a real Redis.

Stores 10,000 small prefixes for one tenant (pipelined `put_many`), then measures, in
milliseconds (p50 / p99 over many calls): listing a page, fetching one prefix's metadata, fetching
one small prefix, and storing / fetching a Llama-3-8B-sized prefix (32 layers, 8 kv heads,
head_dim 128, 20 virtual tokens, bf16: 2.5 MiB). Prints a table, writes JSON to bench/results/,
and deletes its own namespace afterwards.

    python bench/registry_bench.py [--redis-url redis://127.0.0.1:6379/0] [--prefixes 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import torch

from prefix_registry.artifact import PrefixArtifact
from prefix_registry.fingerprint import ModelFingerprint
from prefix_registry.redis_store import RedisStore

RESULTS = Path(__file__).parent / "results"
TENANT = "bench"
SMALL = ModelFingerprint("LlamaForCausalLM", "llama", 2, 64, 2, 16, 384, "0" * 64)
LLAMA3_8B = ModelFingerprint("LlamaForCausalLM", "llama", 32, 4096, 8, 128, 128256, "1" * 64)


def kv_artifact(name: str, model: ModelFingerprint, prefix_len: int, dtype: torch.dtype,
                seed: int) -> PrefixArtifact:
    g = torch.Generator().manual_seed(seed)
    shape = (model.num_layers, model.num_kv_heads, prefix_len, model.head_dim)
    tensors = {"keys": torch.randn(shape, generator=g).to(dtype),
               "values": torch.randn(shape, generator=g).to(dtype)}
    return PrefixArtifact.create(name=name, tenant=TENANT, tensors=tensors, model=model)


async def timed(fn: Callable[[], Awaitable[Any]], calls: int) -> dict[str, float]:
    """p50 / p99 / mean of `calls` sequential calls, in milliseconds."""
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        await fn()
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    return {"calls": calls, "p50_ms": statistics.median(samples),
            "p99_ms": samples[min(calls - 1, int(calls * 0.99))],
            "mean_ms": statistics.fmean(samples)}


async def populate(store: RedisStore, count: int) -> float:
    await store.create_tenant(TENANT)
    start = time.perf_counter()
    artifacts = [kv_artifact(f"p{i:05d}", SMALL, 1, torch.float32, i) for i in range(count)]
    await store.put_many(artifacts)
    return time.perf_counter() - start


async def measure(store: RedisStore, count: int) -> dict[str, dict[str, float]]:
    names = [f"p{i:05d}" for i in range(count)]
    rnd = random.Random(0)
    results = {
        "list first page (50)": await timed(lambda: store.list(TENANT, limit=50), 300),
        "list page at a random cursor (50)": await timed(
            lambda: store.list(TENANT, limit=50, cursor=rnd.choice(names)), 300),
        "get_meta (latest)": await timed(lambda: store.get_meta(TENANT, rnd.choice(names)), 1000),
        "get_meta (name@1)": await timed(
            lambda: store.get_meta(TENANT, rnd.choice(names) + "@1"), 1000),
        "get small prefix": await timed(lambda: store.get(TENANT, rnd.choice(names)), 1000),
    }
    big = kv_artifact("llama3-8b", LLAMA3_8B, 20, torch.bfloat16, 1)
    results["put Llama-3-8B prefix (2.5 MiB)"] = await timed(lambda: store.put(big), 20)
    results["get Llama-3-8B prefix (2.5 MiB)"] = await timed(
        lambda: store.get(TENANT, "llama3-8b"), 100)
    results["get_meta Llama-3-8B prefix"] = await timed(
        lambda: store.get_meta(TENANT, "llama3-8b"), 300)
    return results


def report(results: dict[str, dict[str, float]], setup_s: float, count: int) -> None:
    print(f"\nsetup: {count} prefixes stored with put_many in {setup_s:.2f} s")
    print(f"{'operation':<36} {'calls':>6} {'p50 ms':>9} {'p99 ms':>9} {'mean ms':>9}")
    for name, r in results.items():
        print(f"{name:<36} {r['calls']:>6} {r['p50_ms']:>9.3f} {r['p99_ms']:>9.3f}"
              f" {r['mean_ms']:>9.3f}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--prefixes", type=int, default=10_000)
    args = parser.parse_args()
    store = RedisStore(args.redis_url, namespace=f"prefix-serve-bench-{uuid.uuid4().hex[:8]}:")
    try:
        setup_s = await populate(store, args.prefixes)
        results = await measure(store, args.prefixes)
    finally:
        deleted = await store.clear_namespace()
        await store.close()
    report(results, setup_s, args.prefixes)
    print(f"cleaned up: {deleted} keys deleted")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "registry_bench.json"
    out.write_text(json.dumps({
        "prefixes": args.prefixes, "setup_s": setup_s, "results": results,
        "machine": f"{platform.machine()} {platform.processor()} (shared 2-core AMD EPYC)",
        "python": platform.python_version(), "torch": torch.__version__,
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    asyncio.run(main())
