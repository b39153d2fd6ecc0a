"""What `Engine.submit` refuses, and that no sampling value it accepts can fail the engine's step:
every field is checked again at submit, whatever the HTTP schema already bounded."""

from __future__ import annotations

import dataclasses

import pytest

from server.engine import Engine, EngineConfig, EngineRequest, SamplingParams
from server.engine.checks import MAX_SEED, MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS
from server.errors import InvalidRequestError
from tests.engine.helpers import running

PROMPT = [5, 17, 42, 9, 88, 3, 120, 7]


def _sampled(**fields: object) -> EngineRequest:
    params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=7, ignore_eos=True)
    return EngineRequest(PROMPT, dataclasses.replace(params, **fields))


@pytest.mark.parametrize("top_k", [2**63, 2**64 + 5, 10**30])
async def test_a_top_k_beyond_the_vocabulary_is_off_and_the_engine_lives(load_tiny,
                                                                          top_k: int) -> None:
    async with running(load_tiny("llama")) as engine:
        off = await engine.submit(_sampled(top_k=0)).collect()
        huge = await engine.submit(_sampled(top_k=top_k)).collect()
        assert huge.finished.finish_reason.value == "length", huge.finished
        assert huge.token_ids == off.token_ids
        assert engine.alive


async def test_the_largest_seed_is_accepted(load_tiny) -> None:
    async with running(load_tiny("llama")) as engine:
        done = await engine.submit(_sampled(seed=MAX_SEED)).collect()
        assert done.finished.finish_reason.value == "length"
        assert engine.alive


@pytest.mark.parametrize(
    "fields",
    [
        {"seed": MAX_SEED + 1},
        {"seed": -1},
        {"seed": 2**200},
        {"temperature": float("nan")},
        {"temperature": float("inf")},
        {"top_p": float("nan")},
        {"top_k": 1.5},
        {"max_new_tokens": 2.0},
        {"max_new_tokens": True},
        {"stop": ("x",) * (MAX_STOP_STRINGS + 1)},
        {"stop": ("x" * (MAX_STOP_STRING_CHARS + 1),)},
        {"stop": (b"bytes",)},
        {"stop_token_ids": (1,) * (MAX_STOP_STRINGS * 4 + 1)},
        {"stop_token_ids": (2**70,)},
        {"stop_token_ids": ("1",)},
    ],
)
async def test_out_of_range_sampling_is_refused_at_submit(load_tiny, fields: dict) -> None:
    engine = Engine(load_tiny("llama"), EngineConfig(max_batch_size=1))
    with pytest.raises(InvalidRequestError):
        engine.submit(_sampled(**fields))
    assert engine.alive


@pytest.mark.parametrize("request_", [EngineRequest("a\ud800b"),
                                      EngineRequest([1], SamplingParams(stop=("\udfff",)))])
async def test_lone_surrogates_are_refused_at_submit(load_tiny, request_: EngineRequest) -> None:
    engine = Engine(load_tiny("llama"), EngineConfig(max_batch_size=1))
    with pytest.raises(InvalidRequestError, match="Unicode"):
        engine.submit(request_)
