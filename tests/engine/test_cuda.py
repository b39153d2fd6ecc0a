"""The engine on a CUDA device against the independent reference (skipped without a GPU).

The reference is the one `test_exactness.py` uses: repeated full forwards through the model's own
code with the prefix as past K/V, on the same device and dtype.
- float32: each request's greedy tokens are identical to the reference, alone and in a mixed
  batch, and its first-step logits are within 1e-4.
- bfloat16: batch shapes change the rounding, so a near-tie may flip and the sequences part. So
  the reference scores the engine's own output (teacher forcing, one forward) and every token the
  engine chose must be within a bfloat16 tolerance of the reference's best at that position;
  first-step logits must agree within the same tolerance.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from server.engine import Completion, EngineRequest, SamplingParams
from server.models.loader import LoadedModel, load_model
from server.models.prefix_kv import forward_with_prefix, prefix_kv
from tests.engine.helpers import (
    RecordingRunner,
    make_prefix,
    recorder,
    reference_greedy,
    running,
)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

FP32_LOGITS_TOL = 1e-4
BF16_TOL = 0.05  # of the reference's logit range at that position


@pytest.fixture(scope="module")
def load_cuda(tiny_model_dir: Callable[..., Path]) -> Callable[..., LoadedModel]:
    """Factory: a tiny model of `family` in `dtype` on the GPU, through the real loader."""
    cache: dict[tuple[str, str], LoadedModel] = {}

    def get(family: str, dtype: str) -> LoadedModel:
        if (family, dtype) not in cache:
            cache[(family, dtype)] = load_model(str(tiny_model_dir(family)), dtype=dtype,
                                                device="cuda")
        return cache[(family, dtype)]

    return get


def workload(loaded: LoadedModel, n: int = 12) -> list[EngineRequest]:
    """Prefixes of 3 (direct form), 8 and 17 tokens (seed form) and none; prompts of 1-39."""
    prefixes = [make_prefix(loaded, 3, "kv", seed=1, name="a"),
                make_prefix(loaded, 8, "p_theta", seed=2, name="b"),
                make_prefix(loaded, 17, "p_theta", seed=3, name="c"), None]
    g = torch.Generator().manual_seed(11)
    requests = []
    for i in range(n):
        length = int(torch.randint(1, 40, (1,), generator=g))
        prompt = torch.randint(1, loaded.fingerprint.vocab_size, (length,), generator=g).tolist()
        sampling = SamplingParams(max_new_tokens=10 + i % 7, ignore_eos=True)
        requests.append(EngineRequest(prompt, sampling, prefixes[i % 4], request_id=f"r{i}"))
    return requests


async def run_alone_and_mixed(
    loaded: LoadedModel, requests: list[EngineRequest]
) -> tuple[dict[str, Completion], dict[str, Completion], dict[str, torch.Tensor]]:
    """Each request alone, then all of them in waves into 8 rows (so some queue); completions
    of both runs by request id and the first-step logits of both (ids `alone-*`, `mixed-*`)."""
    alone, mixed = {}, {}
    async with running(loaded, runner=RecordingRunner, max_batch_size=8,
                       max_num_batched_tokens=32) as engine:
        for request in requests:
            solo = dataclasses.replace(request, request_id=f"alone-{request.request_id}")
            alone[request.request_id] = await engine.submit(solo).collect()
        tagged = [dataclasses.replace(r, request_id=f"mixed-{r.request_id}") for r in requests]
        generated = engine.stats().tokens_generated
        streams = [engine.submit(r) for r in tagged[: len(tagged) // 2]]
        while engine.stats().tokens_generated == generated:  # until the first wave decodes
            await asyncio.sleep(0.001)
        streams += [engine.submit(r) for r in tagged[len(tagged) // 2:]]
        for request, done in zip(requests, await asyncio.gather(*(s.collect() for s in streams)),
                                 strict=True):
            mixed[request.request_id] = done
        logits = dict(recorder(engine).first_logits)
    return alone, mixed, logits


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3"])
async def test_float32_greedy_matches_reference_alone_and_mixed(load_cuda, family: str) -> None:
    loaded = load_cuda(family, "float32")
    requests = workload(loaded)
    alone, mixed, logits = await run_alone_and_mixed(loaded, requests)
    for request in requests:
        want, first = reference_greedy(loaded, _ids(request), request.prefix,
                                       request.sampling.max_new_tokens)
        rid = request.request_id
        assert alone[rid].token_ids == want, rid
        assert mixed[rid].token_ids == want, rid
        for tag in ("alone", "mixed"):
            diff = (logits[f"{tag}-{rid}"] - first.cpu()).abs().max().item()
            assert diff < FP32_LOGITS_TOL, (tag, rid, diff)


async def test_bfloat16_tokens_are_the_references_choices(load_cuda) -> None:
    loaded = load_cuda("llama", "bfloat16")
    requests = workload(loaded)
    alone, mixed, logits = await run_alone_and_mixed(loaded, requests)
    for request in requests:
        rid = request.request_id
        _, first = reference_greedy(loaded, _ids(request), request.prefix, 1)
        for tag, result in (("alone", alone[rid]), ("mixed", mixed[rid])):
            gap = worst_choice_gap(loaded, request, result.token_ids)
            assert gap <= BF16_TOL, (tag, rid, gap)
            diff = (logits[f"{tag}-{rid}"] - first.cpu()).abs().max().item()
            assert diff <= BF16_TOL * _range(first), (tag, rid, diff)


async def test_seeded_sampling_is_reproducible_in_any_batch_on_cuda(load_cuda) -> None:
    loaded = load_cuda("llama", "float32")
    params = SamplingParams(max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.95, seed=77,
                            ignore_eos=True)
    sampled = EngineRequest([5, 17, 42, 9, 88, 3], params, request_id="sampled")
    async with running(loaded) as engine:
        alone = await engine.submit(sampled).collect()
    others = workload(loaded, n=6)
    async with running(loaded, max_batch_size=8, max_num_batched_tokens=16) as engine:
        streams = [engine.submit(r) for r in others[:3]]
        streams.append(engine.submit(sampled))
        streams += [engine.submit(r) for r in others[3:]]
        results = await asyncio.gather(*(s.collect() for s in streams))
    assert results[3].token_ids == alone.token_ids
    greedy = reference_greedy(loaded, _ids(sampled), None, 12)[0]
    assert alone.token_ids != greedy  # it really sampled


@torch.no_grad()
def worst_choice_gap(loaded: LoadedModel, request: EngineRequest, tokens: list[int]) -> float:
    """The largest (best logit - logit of the engine's token) over the engine's tokens, as a
    share of the logit range, with the reference scoring prompt + tokens in one forward."""
    keys = values = None
    if request.prefix is not None:
        keys, values = prefix_kv(loaded, request.prefix.form, request.prefix.tensors)
    prompt = _ids(request)
    ids = torch.tensor([prompt + tokens[:-1]])
    scores = forward_with_prefix(loaded, ids, None, keys, values)[0, len(prompt) - 1:].float()
    chosen = scores.gather(1, torch.tensor(tokens, device=scores.device)[:, None])[:, 0]
    gaps = (scores.max(-1).values - chosen) / (scores.max(-1).values - scores.min(-1).values)
    return float(gaps.max())


def _ids(request: EngineRequest) -> list[int]:
    assert isinstance(request.prompt, list)
    return request.prompt


def _range(logits: torch.Tensor) -> float:
    return float(logits.max() - logits.min())

