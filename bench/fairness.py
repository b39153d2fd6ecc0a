"""Fairness between tenants over HTTP: a flooding tenant beside a light one, under FIFO and VTC.

A real `prefix-serve` process serves the bench model (`common.BENCH_LLAMA`: a random-weight
Llama of 25.2M parameters, float32) with `--max-batch-size 8`, first with `--fairness fifo`, then
with `--fairness vtc`, in the same run and on the same workload. Two tenants, each with its own
key and its own 16-token prefix, created through the admin API. A client in its own process
(`tenant_load.py`): "light" first sends a few requests alone on the idle server; then "flood"
keeps 32 streamed requests in flight (8 run, the rest wait), and once the flood is steady "light"
sends its requests one after the other. Every request: a token-id prompt of 16-48 tokens; the
light tenant's ask for 32 greedy tokens, the flood's for 16-48, so that its requests end at
different steps as a real mix does (the model never picks EOS: every request generates all the
tokens it asks for).

Reported per policy, over the light tenant's span beside the flood (its first send to its last
end): each tenant's generated tokens/s and its share of them (the text chunks the client
received in the span; one chunk per token with the bench model's tokenizer), the light
tenant's TTFT p50/p99 (send to first text; alone on the idle server for reference), also in
decode steps of the full batch (the median time between two tokens of a flood request in the
span), which moves less with the machine's load than seconds do, its request time p50, and the
server's queue (median of `prefix_serve_queued_requests` samples).

    python -m bench.fairness [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import random
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bench.common import BENCH_LLAMA, RESULTS, build_model, kv_prefix, pct, report
from bench.http_throughput import MODEL_DIR, MODEL_TEXT
from bench.serving import ADMIN_KEY, add_tenant_and_prefixes, prefix_serve, run_client
from server.models.loader import load_model

POLICIES = ("fifo", "vtc")
TENANTS = ("flood", "light")
BATCH = 8  # --max-batch-size: the flood keeps it full
PREFIX_LEN = 16
PROMPT_LEN = (16, 48)


@dataclass(frozen=True)
class Shape:
    flood_concurrency: int  # the flood's requests in flight at all times
    light_requests: int  # the light tenant's requests beside the flood, one at a time
    alone_requests: int  # ... and before it, alone on the idle server
    new_tokens: int  # greedy tokens per request
    warmup: int  # flood requests finished before the light tenant starts


FULL = Shape(flood_concurrency=32, light_requests=16, alone_requests=4, new_tokens=32,
             warmup=BATCH)
QUICK = Shape(flood_concurrency=16, light_requests=6, alone_requests=2, new_tokens=16,
              warmup=BATCH)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    shape = QUICK if args.quick else FULL
    model_dir = build_model(MODEL_DIR, BENCH_LLAMA)
    fp = load_model(str(model_dir), dtype="float32", device="cpu").fingerprint
    prefixes = {tenant: kv_prefix(fp, PREFIX_LEN, seed) for seed, tenant in enumerate(TENANTS)}
    requests = workload(shape, fp.vocab_size)
    runs = {}
    for policy in POLICIES:
        flags = ["--max-batch-size", str(BATCH), "--fairness", policy]
        with tempfile.TemporaryDirectory() as tmp, prefix_serve(
                model_dir, flags, Path(tmp), args.threads) as server:
            keys = {t: add_tenant_and_prefixes(server.url, [prefixes[t]], tenant=t)
                    for t in TENANTS}
            spec = {"url": server.url, "keys": keys, **requests, **asdict(shape),
                    "metrics_every_s": 0.25, "admin_key": ADMIN_KEY}
            result = run_client(spec, module="bench.tenant_load")
        runs[policy] = summarize(result)
    write_report(args, shape, runs)


def workload(shape: Shape, vocab_size: int) -> dict[str, list[dict[str, Any]]]:
    """Streamed completions through each tenant's own prefix "p0": the flood's (two per
    worker, cycled) and the light tenant's."""
    rng = random.Random(0)

    def request(new_tokens: int) -> dict[str, Any]:
        prompt = [rng.randrange(0, vocab_size - 1) for _ in range(rng.randint(*PROMPT_LEN))]
        return {"model": "p0", "prompt": prompt, "max_tokens": new_tokens}

    # The flood's lengths vary around the light tenant's, so that its requests do not all end
    # at the same step (the batch would turn over in lockstep, and so would every wait).
    half = shape.new_tokens // 2
    return {"flood": [request(rng.randint(half, 3 * half))
                      for _ in range(2 * shape.flood_concurrency)],
            "light": [request(shape.new_tokens) for _ in range(shape.light_requests)]}


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    start, end = result["window"]
    span = end - start
    done = result["requests"]
    tokens = {t: sum(start <= stamp <= end for r in done if r["tenant"] == t
                     for stamp in r["times"]) for t in TENANTS}
    total = sum(tokens.values())
    light = [r for r in done if r["phase"] == "light"]
    alone = [r for r in done if r["phase"] == "alone"]
    queued = [s["prefix_serve_queued_requests"] for s in result["metrics"]
              if start <= s["t"] <= end and "prefix_serve_queued_requests" in s]
    # One decode step of the full batch, as the flood's streams saw it in the span: TTFT in
    # steps changes less with the machine's load than TTFT in seconds.
    step_s = pct([(r["times"][-1] - r["times"][0]) / (len(r["times"]) - 1) for r in done
                  if r["tenant"] == "flood" and len(r["times"]) > 1
                  and start <= r["times"][0] and r["times"][-1] <= end], 50)
    return {
        "span_s": span,
        "tok_s": {t: n / span for t, n in tokens.items()},
        "share": {t: n / total for t, n in tokens.items()},
        "light_ttft_p50_s": pct([r["first"] - r["start"] for r in light], 50),
        "light_ttft_p99_s": pct([r["first"] - r["start"] for r in light], 99),
        "alone_ttft_p50_s": pct([r["first"] - r["start"] for r in alone], 50),
        "light_request_p50_s": pct([r["end"] - r["start"] for r in light], 50),
        "alone_request_p50_s": pct([r["end"] - r["start"] for r in alone], 50),
        "queued_median": pct(queued, 50),
        "step_s": step_s,
        "flood_requests": sum(r["tenant"] == "flood" for r in done),
        "complete": all(r["completion_tokens"] == r["max_tokens"] for r in done),
    }


def write_report(args: argparse.Namespace, shape: Shape, runs: dict[str, dict[str, Any]]) -> None:
    lines = [
        ("model", MODEL_TEXT),
        ("workload", f"flood: {shape.flood_concurrency} requests in flight; light: "
                     f"{shape.light_requests} requests one at a time ({shape.alone_requests} alone "
                     "first); prompts "
                     f"of {PROMPT_LEN[0]}-{PROMPT_LEN[1]} tokens, a {PREFIX_LEN}-token prefix "
                     f"per tenant; {shape.new_tokens} greedy tokens per light request, "
                     f"{shape.new_tokens // 2}-{3 * (shape.new_tokens // 2)} per flood request"),
        ("server", f"prefix-serve --max-batch-size {BATCH}, otherwise default flags"
                   + (f", OMP_NUM_THREADS={args.threads}" if args.threads else "")),
    ]
    for policy, run in runs.items():
        tok, share, step = run["tok_s"], run["share"], run["step_s"]
        lines += [
            (f"{policy}: tokens/s", f"flood {tok['flood']:.1f} ({share['flood']:.0%}), light "
                                    f"{tok['light']:.1f} ({share['light']:.0%}) over "
                                    f"{run['span_s']:.1f} s; median queue "
                                    f"{run['queued_median']:.0f}"),
            (f"{policy}: light TTFT", f"p50 {run['light_ttft_p50_s']:.2f} s, p99 "
                                      f"{run['light_ttft_p99_s']:.2f} s (alone: p50 "
                                      f"{run['alone_ttft_p50_s']:.2f} s)"),
            (f"{policy}: light TTFT in steps", f"p50 {run['light_ttft_p50_s'] / step:.0f}, p99 "
                                               f"{run['light_ttft_p99_s'] / step:.0f} (one "
                                               f"decode step of the full batch: {step:.3f} s)"),
            (f"{policy}: light request", f"p50 {run['light_request_p50_s']:.2f} s (alone: "
                                         f"{run['alone_request_p50_s']:.2f} s)"),
        ]
    fifo, vtc = runs["fifo"], runs["vtc"]
    seconds = fifo["light_ttft_p50_s"] / vtc["light_ttft_p50_s"]
    steps = seconds * vtc["step_s"] / fifo["step_s"]
    lines += [
        ("light TTFT p50, fifo / vtc", f"{seconds:.1f}x in seconds, {steps:.1f}x in steps"),
        ("every request complete", str(all(run["complete"] for run in runs.values()))),
    ]
    report("fairness", "Fairness: a flooding tenant beside a light one, FIFO vs VTC", lines,
           {"quick": args.quick, "shape": asdict(shape), "runs": runs}, args.results_dir)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="flood of 16 in flight, 6 light requests of 16 tokens")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads here and OMP_NUM_THREADS for the server")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    return parser.parse_args()


if __name__ == "__main__":
    main()
