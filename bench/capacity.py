"""Capacity: requests running at once in a fixed KV budget, against the ideal.

A real `prefix-serve` process serves the bench model (`common.BENCH_LLAMA`, float32, 32 KiB of
K/V per token) with `--kv-cache-mb` fixed (64; 48 with `--quick`) and `--max-batch-size` raised
to the number of requests, so that memory and not the cap limits the batch. A tenant uploads four
prefixes of 100 tokens; a client in its own process sends all requests at once (prompts of 8-12
tokens, 16 greedy tokens each) while sampling `/metrics` every 20 ms. Reported: the peak of
`prefix_serve_running_requests` against the ideal

    (budget - K/V of the four prefixes) / (K/V of one request's own tokens: prompt + 16)

and, when the server reports its KV blocks, the ideal with each request rounded up to whole
blocks. Target: peak >= 0.75x the ideal.

    python -m bench.capacity [--quick] [--kv-cache-mb 64]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch

from bench.common import (
    BENCH_LLAMA,
    RESULTS,
    build_model,
    kv_bytes_per_token,
    kv_prefix,
    make_workload,
    report,
)
from bench.http_throughput import MODEL_DIR, MODEL_TEXT
from bench.serving import add_tenant_and_prefixes, client_spec, prefix_serve, run_client
from server.models.loader import load_model

PREFIX_LEN = 100
PROMPT = (8, 12)
NEW_TOKENS = 16
MiB = 2**20


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    budget_mb = args.kv_cache_mb or (48 if args.quick else 64)
    model_dir = build_model(MODEL_DIR, BENCH_LLAMA)
    loaded = load_model(str(model_dir), dtype="float32", device="cpu")
    fp = loaded.fingerprint
    per_token = kv_bytes_per_token(fp, loaded.dtype)
    own_tokens = sum(PROMPT) / 2 + NEW_TOKENS
    ideal = int((budget_mb * MiB - 4 * PREFIX_LEN * per_token) // (own_tokens * per_token))
    if ideal < 1:
        raise SystemExit(f"--kv-cache-mb {budget_mb} does not hold the four prefixes")
    requests = min(250, max(8, 2 * ideal if args.quick else 3 * ideal))
    workload = make_workload(requests, [PREFIX_LEN] * 4, PROMPT, NEW_TOKENS, fp.vocab_size)
    tensors = [kv_prefix(fp, PREFIX_LEN, i) for i in range(4)]
    flags = ["--kv-cache-mb", str(budget_mb), "--max-batch-size", str(requests)]
    try:
        with tempfile.TemporaryDirectory() as tmp, prefix_serve(model_dir, flags, Path(tmp),
                                                                args.threads) as server:
            key = add_tenant_and_prefixes(server.url, tensors)
            result = run_client(client_spec(server.url, key, workload, metrics_every_s=0.02))
    except RuntimeError as exc:  # e.g. the budget holds no request at all: peak 0
        print(f"the server did not serve: {str(exc)[-600:]}")
        result = {"metrics": [], "requests": [], "wall_s": float("nan"), "error": str(exc)}
    summarize(args, budget_mb, per_token, own_tokens, ideal, requests, result)


def block_tokens(samples: list[dict[str, float]], budget_bytes: int, per_token: int) -> int | None:
    """Tokens per KV block: as the server reports it, or inferred from its block count."""
    size = max((s.get("prefix_serve_kv_block_size_tokens", 0.0) for s in samples), default=0.0)
    if size:
        return int(size)
    names = sorted({n for s in samples for n in s if n.startswith("prefix_serve_kv_blocks")
                    and ("total" in n or n == "prefix_serve_kv_blocks")})
    for name in names:
        blocks = max((s.get(name, 0.0) for s in samples), default=0.0)
        if blocks:
            return max(1, round(budget_bytes / (blocks * per_token)))
    return None


def summarize(args: argparse.Namespace, budget_mb: int, per_token: int, own_tokens: float,
              ideal: int, requests: int, result: dict[str, Any]) -> None:
    samples = result["metrics"]
    peak = int(max((s.get("prefix_serve_running_requests", 0.0) for s in samples), default=0))
    kv_peaks = {name: max(s.get(name, 0.0) for s in samples)
                for name in sorted({n for s in samples for n in s if "kv" in n})}
    block = block_tokens(samples, budget_mb * MiB, per_token)
    lines = [
        ("model", MODEL_TEXT + f"; K/V {per_token // 1024} KiB per token"),
        ("server", f"--kv-cache-mb {budget_mb} --max-batch-size {requests}, else defaults; "
                   f"OMP_NUM_THREADS={args.threads}"),
        ("workload", f"{requests} requests at once, 4 prefixes of {PREFIX_LEN} tokens, prompts "
                     f"{PROMPT[0]}-{PROMPT[1]}, {NEW_TOKENS} new tokens"),
        ("ideal running", f"{ideal} = ({budget_mb} MiB - 4 x {PREFIX_LEN} tokens) / "
                          f"{own_tokens:g} tokens per request"),
        ("peak running", f"{peak} (sampled every 20 ms over {len(samples)} samples)"),
        ("peak / ideal", f"{peak / ideal:.2f}x (target >= 0.75x)"),
        ("every request complete", str(bool(result["requests"]) and all(
            r["completion_tokens"] == NEW_TOKENS for r in result["requests"]))),
    ]
    if block:
        per_request = -(-own_tokens // block) * block
        prefix_tokens = 4 * -(-PREFIX_LEN // block) * block
        blocked = int((budget_mb * MiB // per_token - prefix_tokens) // per_request)
        lines.append(("ideal in whole blocks", f"{blocked} ({block}-token blocks); peak / that "
                                               f"{peak / max(1, blocked):.2f}x"))
    preempted = max((s.get("prefix_serve_preemptions_total", 0.0) for s in samples), default=0)
    lines.append(("preemptions", f"{preempted:g} (with --admission-lookahead-tokens 0 the server"
                                 " admits on the blocks requests hold so far: more run at once,"
                                 " and some are preempted as they grow)"))
    lines.append(("peak KV metrics", ", ".join(f"{k} {v:g}" for k, v in kv_peaks.items())
                  or "none reported"))
    if "error" in result:
        lines.append(("server error", result["error"].strip().splitlines()[-1][:300]))
    report("capacity", "Capacity in a fixed KV budget", lines,
           {"quick": args.quick, "budget_mb": budget_mb, "ideal": ideal, "peak": peak,
            "ratio": peak / ideal, "block_tokens": block, "preemptions": preempted,
            "kv_metric_peaks": kv_peaks,
            "wall_s": result["wall_s"]}, args.results_dir)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="48 MiB and twice the ideal")
    parser.add_argument("--kv-cache-mb", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for the server")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    return parser.parse_args()


if __name__ == "__main__":
    main()
