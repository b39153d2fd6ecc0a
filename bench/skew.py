"""Skew: short requests' decode speed alone and while one long request decodes beside them.

The bench model (`common.BENCH_LLAMA`, float32) in an engine in this process. The short
requests: 16 at once (8 with `--quick`), two prefixes of 16 tokens, prompts of 16-32 tokens, 48
greedy tokens each (24). The long one: a 900-token prompt, no prefix, 110 greedy tokens.
- alone: the short requests by themselves;
- beside: the long request first; once it decodes (its first token is out), the short ones; the
  long request must still be decoding when the last short one ends (checked).
A short request's decode speed is its tokens after the first over the time from its first to its
last token, as its caller sees them; the median over the short requests is compared. Repeats
alternate the two cases; each case's best is kept. Target: beside >= 0.85x alone.

    python -m bench.skew [--quick] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
from pathlib import Path
from typing import Any

import torch

from bench.common import (
    BENCH_LLAMA,
    RESULTS,
    Trace,
    build_model,
    consume,
    engine_config,
    engine_requests,
    make_workload,
    prefix_sources,
    report,
    run_requests,
)
from bench.http_throughput import MODEL_DIR, MODEL_TEXT
from server.engine import Engine, EngineRequest, SamplingParams
from server.models.loader import LoadedModel, load_model

LONG_PROMPT, LONG_NEW = 900, 110


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(str(build_model(MODEL_DIR, BENCH_LLAMA)), dtype="float32", device="cpu")
    results = asyncio.run(measure(loaded, args))
    summarize(args, results)


async def measure(loaded: LoadedModel, args: argparse.Namespace) -> dict[str, list[Any]]:
    fp = loaded.fingerprint
    count, new_tokens = (8, 24) if args.quick else (16, 48)
    shorts = engine_requests(make_workload(count, [16, 16], (16, 32), new_tokens,
                                           fp.vocab_size), prefix_sources(fp, [16, 16]))
    long_prompt = make_workload(1, [], (LONG_PROMPT, LONG_PROMPT), 1, fp.vocab_size, seed=2)
    long = EngineRequest(long_prompt.rows[0].prompt,
                         SamplingParams(max_new_tokens=LONG_NEW, ignore_eos=True))
    engine = Engine(loaded, engine_config(max_batch_size=32))
    engine.start()
    runs: dict[str, list[Any]] = {"alone": [], "beside": []}
    try:
        await run_requests(engine, shorts[:2])  # warm-up
        for _ in range(1 if args.quick else args.repeats):
            runs["alone"].append(speeds(await run_requests(engine, shorts)))
            runs["beside"].append(await beside(engine, long, shorts))
    finally:
        await engine.shutdown(0)
    return runs


async def beside(engine: Engine, long: EngineRequest, shorts: list[EngineRequest]
                 ) -> dict[str, Any]:
    """The short requests, submitted once the long one decodes."""
    long_trace = Trace(0.0)
    long_task = asyncio.create_task(consume(engine.submit(long), long_trace))
    while not long_trace.token_times:
        if long_task.done():
            raise RuntimeError("the long request ended before it decoded")
        await asyncio.sleep(0.005)
    traces = await run_requests(engine, shorts)
    await long_task
    last_short = max(t.token_times[-1] for t in traces)
    return {**speeds(traces), "long_still_decoding": long_trace.token_times[-1] > last_short}


def speeds(traces: list[Trace]) -> dict[str, Any]:
    rates = [t.decode_rate() for t in traces]
    return {"median_tok_s": statistics.median(rates), "min_tok_s": min(rates),
            "tokens": [len(t.token_ids) for t in traces]}


def summarize(args: argparse.Namespace, runs: dict[str, list[Any]]) -> None:
    alone = max(r["median_tok_s"] for r in runs["alone"])
    beside_best = max(r["median_tok_s"] for r in runs["beside"])
    count = len(runs["alone"][0]["tokens"])
    paired = [b["median_tok_s"] / a["median_tok_s"]  # each repeat ran the two cases back to back
              for a, b in zip(runs["alone"], runs["beside"], strict=True)]
    lines = [
        ("model", MODEL_TEXT),
        ("short requests", f"{count} at once, prompts 16-32, prefixes of 16, "
                           f"{runs['alone'][0]['tokens'][0]} new tokens each"),
        ("long request", f"{LONG_PROMPT}-token prompt, {LONG_NEW} new tokens"),
        ("alone (best)", f"{alone:.1f} tok/s per short request (median)"),
        ("beside the long one (best)", f"{beside_best:.1f} tok/s per short request (median)"),
        ("beside / alone", f"{beside_best / alone:.2f}x (target >= 0.85x); per repeat: "
         + ", ".join(f"{r:.2f}" for r in paired) + f" (median {statistics.median(paired):.2f})"),
        ("long request still decoding", str(all(r["long_still_decoding"]
                                                for r in runs["beside"]))),
    ]
    report("skew", "Skew: short requests beside a long one", lines,
           {"quick": args.quick, "runs": runs, "ratio": beside_best / alone,
            "paired_median": statistics.median(paired)}, args.results_dir)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 short requests x 24 tokens, once")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    return parser.parse_args()


if __name__ == "__main__":
    main()
