"""Throughput over HTTP with default flags against an HF static batch of the same rows.

The bench model (`common.BENCH_LLAMA`: a random-weight Llama of 25.2M parameters, float32) is
saved and served by a real `prefix-serve` process with its default flags (plus the operator key,
a free port and a scratch data dir). A tenant uploads 8 prefixes of 8-32 tokens through the
admin API. A client in its own process sends 32 concurrent streamed requests (prompts of 10-90
tokens, 32 greedy tokens each; the model never picks EOS, so every request generates all of
them) and measures output tokens/s and TTFT. The baseline, in the same run: the same rows as one
HF static batch (`hf_static.py`) in this process. Repeats alternate the two; each side's best
run is kept. Target: HTTP >= 0.9x the static batch.

    python -m bench.http_throughput [--quick] [--repeats 3] [--threads N] [--server-flag=F]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch

from bench.common import (
    BENCH_LLAMA,
    MODELS,
    RESULTS,
    Workload,
    build_model,
    kv_prefix,
    make_workload,
    pct,
    random_lengths,
    report,
)
from bench.hf_static import StaticResult, static_batch
from bench.serving import add_tenant_and_prefixes, client_spec, prefix_serve, run_client
from server.models.loader import load_model

MODEL_DIR = MODELS / "llama-25m-float32"
MODEL_TEXT = ("random Llama, 25.2M parameters (8 layers, hidden 512, 8 heads / 8 KV heads, MLP "
              "1024, vocab 8192, tied embeddings, context 1024), float32")


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    requests, prefixes, new_tokens = (16, 4, 16) if args.quick else (32, 8, 32)
    model_dir = build_model(MODEL_DIR, BENCH_LLAMA)
    loaded = load_model(str(model_dir), dtype="float32", device="cpu")
    fp = loaded.fingerprint
    lengths = random_lengths(prefixes, 8, 32)
    workload = make_workload(requests, lengths, (10, 90), new_tokens, fp.vocab_size)
    tensors = [kv_prefix(fp, length, i) for i, length in enumerate(lengths)]
    warm = make_workload(4, lengths, (10, 20), 4, fp.vocab_size, seed=1)
    runs: list[tuple[StaticResult, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory() as tmp, prefix_serve(
            model_dir, args.server_flag, Path(tmp), args.threads) as server:
        key = add_tenant_and_prefixes(server.url, tensors)
        run_client(client_spec(server.url, key, warm))
        static_batch(loaded.model, warm, tensors)
        for _ in range(1 if args.quick else args.repeats):
            runs.append((static_batch(loaded.model, workload, tensors),
                         run_client(client_spec(server.url, key, workload))))
    texts = [str(loaded.tokenizer.decode(ids)) for ids in runs[0][0].outputs]
    summarize(args, workload, runs, texts)


def http_summary(result: dict[str, Any], new_tokens: int) -> dict[str, Any]:
    done = result["requests"]
    tokens = sum(r["completion_tokens"] or 0 for r in done)
    ttfts = [r["first"] - r["start"] for r in done if r["first"] is not None]
    return {"tokens": tokens, "wall_s": result["wall_s"], "tok_s": tokens / result["wall_s"],
            "ttft_p50_s": pct(ttfts, 50), "ttft_p99_s": pct(ttfts, 99),
            "complete": all(r["completion_tokens"] == new_tokens for r in done)}


def summarize(args: argparse.Namespace, workload: Workload,
              runs: list[tuple[StaticResult, dict[str, Any]]], texts: list[str]) -> None:
    hf = [h.summary() for h, _ in runs]
    http = [http_summary(r, workload.new_tokens) for _, r in runs]
    best_hf = max(hf, key=lambda s: s["tok_s"])
    best_http = max(http, key=lambda s: s["tok_s"])
    same = sum(r["text"] == t for r, t in zip(runs[-1][1]["requests"], texts, strict=True))
    ratio = best_http["tok_s"] / best_hf["tok_s"]
    lines = [
        ("model", MODEL_TEXT),
        ("workload", f"{len(workload.rows)} concurrent requests, {len(workload.prefix_lengths)} "
                     "prefixes of 8-32 tokens, prompts of 10-90 tokens, "
                     f"{workload.new_tokens} greedy tokens each"),
        ("server", "prefix-serve, default flags" + "".join(f", {f}" for f in args.server_flag)
                   + (f", OMP_NUM_THREADS={args.threads}" if args.threads else "")),
        ("HF static batch (best)", f"{best_hf['tok_s']:.1f} tok/s, TTFT (its prefill) "
                                   f"{best_hf['prefill_s']:.2f} s"),
        ("HTTP (best)", f"{best_http['tok_s']:.1f} tok/s, TTFT p50 "
                        f"{best_http['ttft_p50_s']:.2f} s, p99 {best_http['ttft_p99_s']:.2f} s"),
        ("HTTP / static batch", f"{ratio:.2f}x (target >= 0.9x); per repeat: " + ", ".join(
            f"{s['tok_s'] / h['tok_s']:.2f}" for h, s in zip(hf, http, strict=True))),
        ("every request complete", str(all(s["complete"] for s in http))),
        ("same text as the static batch", f"{same}/{len(texts)} requests"),
    ]
    report("http_throughput", "HTTP throughput vs HF static batch", lines,
           {"quick": args.quick, "hf_static": hf, "http": http, "ratio": ratio,
            "same_text": same}, args.results_dir)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 requests x 16 tokens, once")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each side")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads here and OMP_NUM_THREADS for the server")
    parser.add_argument("--server-flag", action="append", default=[], metavar="FLAG",
                        help="a flag for the server beyond the defaults (repeatable), e.g. "
                        "--server-flag=--output-thread=on")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    return parser.parse_args()


if __name__ == "__main__":
    main()
