"""One command for a GPU machine: the CUDA tests, then a Llama-3-8B-shaped model under load.

1. `pytest -m cuda` over the test files that hold CUDA tests (the engine on the GPU against the
   independent reference, float32 and bfloat16).
2. A random-weight model of Llama-3-8B's shape (32 layers, hidden 4096, 32 heads, 8 KV heads,
   intermediate 14336, vocab 128256), bfloat16, built on the GPU from its config (never
   downloaded), saved once with safetensors and loaded through `server.models.loader` like a
   user's model (`--in-process` skips the save and wraps the built model instead).
3. 256 requests over 64 prefixes (16-64 tokens), prompts of 256 tokens, 256 greedy tokens each:
   first as one HF static batch (bench/hf_static.py), then all submitted at once to the engine
   (default options but for the batch cap, the queue and the longest request; an engine with a
   separate prefix cache gets one that holds all 64 prefixes). Reported: output tokens/s, TTFT
   p50/p99, KV memory, the ratio engine / static batch, and how many rows' tokens agree.

Needs no network. Results: JSON under `--results-dir` and a summary on stdout; the exit status is
1 when a CUDA test failed or a request did not complete.

    python -m bench.gpu_check                    # on the GPU machine (~5 minutes on one H200)
    python -m bench.gpu_check --tiny --skip-tests  # the same code on a CPU, tiny model, seconds
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.common import (
    LLAMA3_8B,
    RESULTS,
    TINY_LLAMA,
    build_model,
    check_complete,
    engine_config,
    engine_requests,
    kv_bytes_per_token,
    make_workload,
    pct,
    prefix_sources,
    random_lengths,
    report,
    run_requests,
)
from bench.hf_static import StaticResult, static_batch
from server.engine import Engine
from server.models.loader import LoadedModel, load_model

REPO = Path(__file__).resolve().parents[1]
CUDA_TESTS_TIMEOUT_S = 240


@dataclass(frozen=True)
class Spec:
    shape: dict[str, Any]
    dtype: str
    device: str
    requests: int
    prefixes: int
    prefix_len: tuple[int, int]
    prompt_len: int
    new_tokens: int


FULL = Spec(LLAMA3_8B, "bfloat16", "cuda", 256, 64, (16, 64), 256, 256)
TINY = Spec(TINY_LLAMA, "float32", "cpu", 16, 4, (3, 17), 16, 8)


def main() -> None:
    args = parse_args()
    spec = TINY if args.tiny else FULL
    data: dict[str, Any] = {"spec": {**spec.__dict__, "shape": spec.shape}, "phases_s": {}}
    phases = data["phases_s"]
    tests_ok = True
    if not args.skip_tests:
        data["cuda_tests"] = run_cuda_tests()
        tests_ok = data["cuda_tests"]["returncode"] == 0
    started = time.perf_counter()
    loaded = load(spec, args)
    phases["build_and_load"] = time.perf_counter() - started
    lengths = random_lengths(spec.prefixes, *spec.prefix_len)
    workload = make_workload(spec.requests, lengths, (spec.prompt_len, spec.prompt_len),
                             spec.new_tokens, loaded.fingerprint.vocab_size)
    sources = prefix_sources(loaded.fingerprint, lengths)
    started = time.perf_counter()
    hf = hf_run(loaded, workload, sources)
    phases["hf_static"] = time.perf_counter() - started
    started = time.perf_counter()
    engine = asyncio.run(engine_run(loaded, workload, sources))
    phases["engine"] = time.perf_counter() - started
    data.update(hf_static=hf.summary(), engine=engine, agreement=agreement(hf, engine))
    data["kv"] = kv_needed(loaded, workload)
    summarize(spec, data, args.results_dir)
    complete = engine.pop("complete")
    sys.exit(0 if tests_ok and complete else 1)


def run_cuda_tests() -> dict[str, Any]:
    """`pytest -m cuda` over the test files that mention the marker (collecting the whole suite
    would import the server's and the registry's dependencies, which a GPU image may lack)."""
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py")
                   if "mark.cuda" in p.read_text())
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
               *files]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                              timeout=CUDA_TESTS_TIMEOUT_S)
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        partial = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        code, output = -1, f"{partial}\ntimed out after {CUDA_TESTS_TIMEOUT_S} s"
    tail = output.strip().splitlines()[-15:]
    print("\n".join(["== pytest -m cuda", *tail]), flush=True)
    return {"files": files, "returncode": code, "wall_s": time.perf_counter() - started,
            "tail": tail}


def load(spec: Spec, args: argparse.Namespace) -> LoadedModel:
    """Build the random model on its device; save it once and load it the user's way."""
    dtype = getattr(torch, spec.dtype)
    name = "tiny-llama" if spec is TINY else "llama3-8b-shape"
    directory = args.model_dir or RESULTS / "models" / f"{name}-{spec.dtype}"
    if args.in_process:
        return wrap_built(spec, dtype)
    build_model(directory, spec.shape, dtype, spec.device)
    _free()
    return load_model(str(directory), dtype=spec.dtype, device=spec.device)


def wrap_built(spec: Spec, dtype: torch.dtype) -> LoadedModel:
    """The model built in this process, wrapped as the loader would (no disk round trip)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from bench.common import synthetic_tokenizer
    from server.models.families import family_for
    from server.models.loader import model_fingerprint

    eos = spec.shape["vocab_size"] - 1
    config = LlamaConfig(**spec.shape, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    torch.manual_seed(0)
    with torch.device(spec.device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.get_output_embeddings().weight.data[eos].zero_()
    model.eval().requires_grad_(False)
    family = family_for(config)
    return LoadedModel(model, synthetic_tokenizer(config.vocab_size), family,
                       model_fingerprint(model, family), "in-process", torch.device(spec.device),
                       dtype, config.max_position_embeddings)


def hf_run(loaded: LoadedModel, workload: Any, sources: list[Any]) -> StaticResult:
    """The static batch, after a small warm-up; prefixes already on the device."""
    prefixes = [{k: t.to(loaded.device, loaded.dtype) for k, t in s.tensors.items()}
                for s in sources]
    warm = make_workload(4, workload.prefix_lengths[:2], (8, 8), 4, loaded.fingerprint.vocab_size)
    static_batch(loaded.model, warm, prefixes)
    result = static_batch(loaded.model, workload, prefixes)
    del prefixes
    _free()
    return result


async def engine_run(loaded: LoadedModel, workload: Any, sources: list[Any]) -> dict[str, Any]:
    """All requests at once into a fresh engine, after a warm-up without prefixes."""
    longest = max(workload.prefix_lengths) + max(len(r.prompt) for r in workload.rows)
    prefixes_bytes = kv_needed(loaded, workload)["prefixes_bytes"]
    config = engine_config(max_batch_size=len(workload.rows), max_queue=4 * len(workload.rows),
                           max_seq_len=longest + workload.new_tokens + 1,
                           prefix_cache_bytes=max(256 * 2**20, 2 * prefixes_bytes))
    before = _allocated(loaded.device)
    engine = Engine(loaded, config)
    pool_bytes = _allocated(loaded.device) - before  # on a CPU: the engine's own count
    engine.start()
    try:
        warm = make_workload(4, [], (8, 8), 4, loaded.fingerprint.vocab_size, seed=1)
        await run_requests(engine, engine_requests(warm, []))
        _reset_peak(loaded.device)
        started = time.perf_counter()
        traces = await run_requests(engine, engine_requests(workload, sources))
        wall = time.perf_counter() - started
        stats = engine.stats()
    finally:
        await engine.shutdown(0)
    tokens = sum(len(t.token_ids) for t in traces)
    ttfts = [t.ttft_s for t in traces]
    result = {
        "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
        "ttft_p50_s": pct(ttfts, 50), "ttft_p99_s": pct(ttfts, 99),
        "kv_pool_bytes": pool_bytes or getattr(stats, "kv_cache_bytes", 0),
        "peak_allocated_bytes": _peak(loaded.device),
        "stats": {k: v for k, v in stats.__dict__.items() if isinstance(v, int | float)},
        "kv_stats": {k: v for k, v in stats.__dict__.items() if "kv" in k or "slots" in k},
        "outputs": [t.token_ids for t in traces], "complete": True,
    }
    try:
        check_complete(traces, workload.new_tokens)
    except RuntimeError as exc:
        print(f"error: {exc}")
        result["complete"] = False
    del engine
    _free()
    return result


def agreement(hf: StaticResult, engine: dict[str, Any]) -> dict[str, float]:
    """Rows whose greedy tokens are identical, and the mean share of tokens before the first
    difference (bfloat16 rounding differs between batch shapes, so near-ties can flip)."""
    pairs = list(zip(hf.outputs, engine.pop("outputs"), strict=True))
    same = sum(a == b for a, b in pairs)
    common = [_common_prefix(a, b) / max(1, len(a)) for a, b in pairs]
    return {"identical_rows": same, "rows": len(pairs),
            "mean_agreeing_prefix": sum(common) / max(1, len(common))}


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def kv_needed(loaded: LoadedModel, workload: Any) -> dict[str, int]:
    """K/V bytes the workload needs at its peak: each distinct prefix once, plus every request's
    own tokens (prompt + output)."""
    per_token = kv_bytes_per_token(loaded.fingerprint, loaded.dtype)
    own = sum(len(r.prompt) + workload.new_tokens for r in workload.rows)
    return {"bytes_per_token": per_token, "prefixes_bytes": per_token * sum(
        workload.prefix_lengths), "requests_bytes": per_token * own}


def summarize(spec: Spec, data: dict[str, Any], results_dir: Path) -> None:
    hf, engine, kv, agree = data["hf_static"], data["engine"], data["kv"], data["agreement"]
    tests = data.get("cuda_tests")
    lines = [
        ("cuda tests", "skipped" if tests is None else
         f"{'passed' if tests['returncode'] == 0 else 'FAILED'} ({tests['wall_s']:.0f} s)"),
        ("workload", f"{spec.requests} requests, {spec.prefixes} prefixes "
                     f"{spec.prefix_len[0]}-{spec.prefix_len[1]} tokens, prompt "
                     f"{spec.prompt_len}, output {spec.new_tokens}, {spec.dtype} on "
                     f"{spec.device}"),
        ("HF static batch", f"{hf['tok_s']:.0f} tok/s, TTFT (prefill) {hf['prefill_s']:.2f} s"),
        ("engine", f"{engine['tok_s']:.0f} tok/s, TTFT p50 {engine['ttft_p50_s']:.2f} s, "
                   f"p99 {engine['ttft_p99_s']:.2f} s"),
        ("engine / static batch", f"{engine['tok_s'] / hf['tok_s']:.2f}x"),
        ("KV memory", f"pool {_size(engine['kv_pool_bytes'])} allocated at start ("
                      f"{engine['kv_stats']}); the workload needs {_size(kv['prefixes_bytes'])}"
                      f" of prefixes + {_size(kv['requests_bytes'])} of requests' own tokens"),
        ("peak device memory", _size(engine["peak_allocated_bytes"])),
        ("engine host share", _host_share(engine["stats"])),
        ("greedy agreement", f"{agree['identical_rows']}/{agree['rows']} rows identical, "
                             f"{agree['mean_agreeing_prefix']:.0%} of tokens before a first "
                             "difference"),
        ("phases", ", ".join(f"{k} {v:.0f} s" for k, v in data["phases_s"].items())),
    ]
    report("gpu_check-tiny" if spec is TINY else "gpu_check", "GPU check", lines, data,
           results_dir)


def _host_share(stats: dict[str, float]) -> str:
    """Share of the engine's busy time outside the model's forward, over the whole run."""
    busy, forward = stats.get("busy_s"), stats.get("forward_s")
    if not busy or forward is None:
        return "not reported"
    return f"{1 - forward / busy:.1%} of busy steps outside the forward (prefill included)"


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model on the CPU (seconds)")
    parser.add_argument("--skip-tests", action="store_true", help="do not run pytest -m cuda")
    parser.add_argument("--in-process", action="store_true",
                        help="use the model as built, without saving and loading it")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="where the random model is saved (reused when it matches)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    return parser.parse_args()


if __name__ == "__main__":
    main()
