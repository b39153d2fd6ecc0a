"""Mixed batches give each request exactly what it gets alone.

The reference is independent of the engine: greedy decoding by repeated full forwards through
the model's own code with the prefix as past K/V (`forward_with_prefix`, a DynamicCache).
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from server.engine import Completion, EngineRequest, SamplingParams, TextDelta
from tests.engine.helpers import (
    RecordingRunner,
    make_prefix,
    recorder,
    reference_greedy,
    running,
)

FAMILIES = ["llama", "gpt2", "qwen2", "qwen3", "gpt_neox"]


def _workload(loaded, n: int = 16) -> list[EngineRequest]:
    """n requests: 3 prefixes of different lengths and forms, plus some without a prefix."""
    prefixes = [
        make_prefix(loaded, 3, "kv", seed=1, name="a"),
        make_prefix(loaded, 8, "p_theta", seed=2, name="b"),
        make_prefix(loaded, 17, "p_theta", seed=3, name="c"),
        None,
    ]
    g = torch.Generator().manual_seed(7)
    vocab = loaded.fingerprint.vocab_size
    requests = []
    for i in range(n):
        length = int(torch.randint(1, 40, (1,), generator=g))
        prompt = torch.randint(1, vocab, (length,), generator=g).tolist()
        sampling = SamplingParams(max_new_tokens=12 + i % 9, ignore_eos=True)
        requests.append(EngineRequest(prompt, sampling, prefixes[i % 4], request_id=f"r{i}"))
    return requests


async def _staggered(engine, requests: list[EngineRequest]) -> list[Completion]:
    """Submit in three waves: at once, after the first delta, after the first finish."""
    streams = [engine.submit(r) for r in requests[:6]]
    first = streams[0]
    head = await first.__anext__()
    assert isinstance(head, TextDelta)
    streams += [engine.submit(r) for r in requests[6:12]]
    done = await streams[1].collect()
    streams += [engine.submit(r) for r in requests[12:]]
    rest = await asyncio.gather(*(s.collect() for s in streams[2:]))
    tail = await first.collect()
    whole = Completion(tail.request_id, head.text + tail.text, [*head.token_ids, *tail.token_ids],
                       tail.finished)
    return [whole, done, *rest]


@pytest.mark.parametrize("family", FAMILIES)
async def test_mixed_batch_matches_each_request_alone(load_tiny, family: str) -> None:
    loaded = load_tiny(family)
    requests = _workload(loaded)
    async with running(
        loaded, runner=RecordingRunner, max_batch_size=12, max_num_batched_tokens=32
    ) as engine:
        results = await _staggered(engine, requests)
        stats = engine.stats()
    ran = recorder(engine)
    rows = [len(work) for work in ran.forwards]  # requests in each step's packed forward
    assert 8 <= max(rows) <= 12  # up to max_batch_size requests at once; the others queued
    by_id = {c.request_id: c for c in results}
    for request in requests:
        want, first_logits = reference_greedy(
            loaded, list(request.prompt), request.prefix, request.sampling.max_new_tokens
        )
        got = by_id[request.request_id]
        assert got.finished.finish_reason.value == "length"
        assert got.token_ids == want, request.request_id
        diff = (ran.first_logits[request.request_id] - first_logits).abs().max().item()
        assert diff < 1e-4, (request.request_id, diff)
    # 12 requests use 3 distinct prefixes: each computed once, every other use a hit.
    assert (stats.prefix_cache_misses, stats.prefix_cache_hits) == (3, 9)


def _sampled(prompt: list[int], seed: int, request_id: str) -> EngineRequest:
    params = SamplingParams(max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.95, seed=seed,
                            ignore_eos=True)
    return EngineRequest(prompt, params, request_id=request_id)


async def test_seeded_sampling_is_reproducible_in_any_batch(load_tiny) -> None:
    loaded = load_tiny("llama")
    prompt = [5, 17, 42, 9, 88, 3]
    async with running(loaded) as engine:
        alone = await engine.submit(_sampled(prompt, 1234, "alone")).collect()
    others = _workload(loaded, n=8)
    async with running(loaded, max_batch_size=8, max_num_batched_tokens=16) as engine:
        streams = [engine.submit(r) for r in others[:4]]
        streams.append(engine.submit(_sampled(prompt, 1234, "mixed")))
        streams.append(engine.submit(_sampled(prompt, 99, "other-seed")))
        streams += [engine.submit(r) for r in others[4:]]
        results = {c.request_id: c for c in await asyncio.gather(*(s.collect() for s in streams))}
    assert results["mixed"].token_ids == alone.token_ids
    assert results["other-seed"].token_ids != alone.token_ids
    greedy = reference_greedy(loaded, prompt, None, 12)[0]
    assert alone.token_ids != greedy  # it really sampled
