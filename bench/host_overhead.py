"""Host overhead: the share of an engine step spent outside the model's forward, at 64 rows.

The bench model (`common.BENCH_LLAMA`, float32) in an engine in this process; 64 requests at
once (8 prefixes of 8-32 tokens, prompts of 16-32 tokens, 40 greedy tokens each; 24 with
`--quick`). Measured over the window in which all 64 decode together (from the moment every
request has its first token to the moment the first one has all but one), from two
`EngineStats` snapshots: `busy_s` (steps that ran the model) and `forward_s` (the model's
forward, logits on the host). Host share = 1 - forward / busy; target <= 10%. Also reported: wall
time per step (which includes what the engine does outside `busy_s`), and, measured in the same
run, the decode step of an HF static batch of the same 64 rows (`hf_static.py`).

    python -m bench.host_overhead [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import (
    BENCH_LLAMA,
    RESULTS,
    Trace,
    Workload,
    build_model,
    consume,
    engine_config,
    engine_requests,
    make_workload,
    prefix_sources,
    random_lengths,
    report,
)
from bench.hf_static import static_batch
from bench.http_throughput import MODEL_DIR, MODEL_TEXT
from server.engine import Engine
from server.models.loader import LoadedModel, load_model

ROWS = 64


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(str(build_model(MODEL_DIR, BENCH_LLAMA)), dtype="float32", device="cpu")
    fp = loaded.fingerprint
    lengths = random_lengths(8, 8, 32)
    workload = make_workload(ROWS, lengths, (16, 32), 24 if args.quick else 40, fp.vocab_size)
    window = asyncio.run(engine_window(loaded, workload))
    hf = static_batch(loaded.model, workload, [s.tensors for s in prefix_sources(fp, lengths)])
    summarize(args, window, hf.decode_step_ms)


async def engine_window(loaded: LoadedModel, workload: Workload) -> dict[str, float]:
    """Stats deltas over the steps in which every row decodes."""
    sources = prefix_sources(loaded.fingerprint, workload.prefix_lengths)
    config = engine_config(max_batch_size=ROWS, max_seq_len=256)
    engine = Engine(loaded, config)
    engine.start()
    try:
        warm = make_workload(4, workload.prefix_lengths[:2], (8, 8), 4,
                             loaded.fingerprint.vocab_size, seed=1)
        await asyncio.gather(*(consume(engine.submit(r), Trace(0.0))
                               for r in engine_requests(warm, sources)))
        traces = [Trace(time.perf_counter()) for _ in workload.rows]
        tasks = [asyncio.create_task(consume(engine.submit(r), t))
                 for r, t in zip(engine_requests(workload, sources), traces, strict=True)]
        await _until(lambda: all(t.token_ids for t in traces), tasks)
        start, t0 = engine.stats(), time.perf_counter()
        await _until(lambda: any(len(t.token_ids) >= workload.new_tokens - 1 for t in traces),
                     tasks)
        end, t1 = engine.stats(), time.perf_counter()
        await asyncio.gather(*tasks)
    finally:
        await engine.shutdown(0)
    steps = end.steps - start.steps
    return {"steps": steps, "busy_s": end.busy_s - start.busy_s,
            "forward_s": end.forward_s - start.forward_s, "wall_s": t1 - t0}


async def _until(condition: Any, tasks: list[asyncio.Task[Trace]]) -> None:
    while not condition():
        if all(t.done() for t in tasks):
            raise RuntimeError("the requests ended before the condition held")
        await asyncio.sleep(0.001)


def summarize(args: argparse.Namespace, window: dict[str, float], hf_step_ms: float) -> None:
    steps = max(1, int(window["steps"]))
    host = 1 - window["forward_s"] / window["busy_s"] if window["busy_s"] else float("nan")
    wall_ms = 1000 * window["wall_s"] / steps
    lines = [
        ("model", MODEL_TEXT),
        ("window", f"{window['steps']:.0f} steps with {ROWS} decode rows"),
        ("per step", f"busy {1000 * window['busy_s'] / steps:.1f} ms, forward "
                     f"{1000 * window['forward_s'] / steps:.1f} ms, wall {wall_ms:.1f} ms"),
        ("host share of busy", f"{host:.1%} (target <= 10%)"),
        ("host share of wall", f"{1 - window['forward_s'] / window['wall_s']:.1%}"),
        ("HF static decode step", f"{hf_step_ms:.1f} ms (same rows); engine wall step / it "
                                  f"{wall_ms / hf_step_ms:.2f}x"),
    ]
    report("host_overhead", f"Host overhead at {ROWS} decode rows", lines,
           {"quick": args.quick, "window": window, "host_share": host,
            "hf_decode_step_ms": hf_step_ms}, args.results_dir)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="24 new tokens instead of 40")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    return parser.parse_args()


if __name__ == "__main__":
    main()
