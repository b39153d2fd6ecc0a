"""Engine behaviour with a real tiny model: streaming, stops, cancellation, limits, failures."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch

from server.engine import Engine, EngineConfig, EngineRequest, SamplingParams, TextDelta, Usage
from server.engine.output import use_thread
from server.errors import (
    ContextLengthError,
    FatalEngineError,
    InvalidRequestError,
    OverloadedError,
    ShuttingDownError,
)
from tests.engine.helpers import OnForward, make_prefix, reference_greedy, running

PROMPT = [5, 17, 42, 9, 88, 3, 120, 7]


def _req(n: int = 12, prompt: list[int] | str = PROMPT, **sampling: object) -> EngineRequest:
    params = SamplingParams(max_new_tokens=n, ignore_eos=True)
    return EngineRequest(prompt, dataclasses.replace(params, **sampling))


@pytest.mark.parametrize("output_thread", ["on", "off"])
async def test_deltas_are_valid_text_and_concatenate_to_the_decoded_tokens(
    load_tiny, output_thread: str
) -> None:
    loaded = load_tiny("llama")
    requests = [_req(40, temperature=1.5, seed=s) for s in range(6)]
    requests.append(_req(10, prompt="café 日本語"))
    async with running(loaded, output_thread=output_thread) as engine:
        assert engine.output.threaded == (output_thread == "on")
        streams = [engine.submit(r) for r in requests]
        for request, stream in zip(requests, streams, strict=True):
            deltas = [e async for e in stream]
            text = "".join(d.text for d in deltas[:-1])
            ids = [t for d in deltas[:-1] for t in d.token_ids]
            assert text == loaded.tokenizer.decode(ids, skip_special_tokens=True)
            finished = deltas[-1]
            prompt = request.prompt
            num_prompt = len(loaded.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt)
            assert finished.usage == Usage(num_prompt, len(ids), 0)
            t = finished.timings
            assert 0 <= t.queue_s <= t.ttft_s <= t.total_s


@pytest.mark.parametrize("output_thread", ["on", "off"])
async def test_stop_strings_and_stop_tokens(load_tiny, monkeypatch, output_thread: str) -> None:
    loaded = load_tiny("llama")
    async with running(loaded, output_thread=output_thread) as engine:
        full = await engine.submit(_req(16)).collect()
        stop = full.text[4:7]
        cut = await engine.submit(_req(16, stop=(stop,))).collect()
        assert cut.finished.finish_reason.value == "stop"
        assert cut.text == full.text[: full.text.index(stop)]
        token = full.token_ids[5]
        by_id = await engine.submit(_req(16, stop_token_ids=(token,))).collect()
        first = full.token_ids.index(token)
        assert by_id.token_ids == full.token_ids[: first + 1]
        assert by_id.text == loaded.tokenizer.decode(full.token_ids[:first])
        assert by_id.finished.finish_reason.value == "stop"
    # EOS ends a request unless ignore_eos.
    monkeypatch.setattr(loaded.model.generation_config, "eos_token_id", full.token_ids[3])
    async with running(loaded, output_thread=output_thread) as engine:
        eos = await engine.submit(_req(16, ignore_eos=False)).collect()
        ignored = await engine.submit(_req(16)).collect()
    assert eos.finished.finish_reason.value == "stop" and len(eos.token_ids) <= 4
    assert ignored.token_ids == full.token_ids


def test_output_thread_auto_leaves_the_cores_to_torch_on_a_busy_cpu(monkeypatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert not use_thread("auto", cpu) and use_thread("auto", cuda)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert use_thread("auto", cpu)
    assert use_thread("on", cpu) and not use_thread("off", cuda)


async def test_cancel_leaves_the_batch_and_frees_its_blocks(load_tiny) -> None:
    loaded = load_tiny("llama")
    async with running(loaded, max_batch_size=1) as engine:
        running_stream = engine.submit(_req(200))
        waiting_stream = engine.submit(_req(5))
        assert isinstance(await running_stream.__anext__(), TextDelta)
        waiting_stream.cancel()
        running_stream.cancel()
        for stream in (running_stream, waiting_stream):
            done = await stream.collect()
            assert done.finished.finish_reason.value == "cancelled"
        assert done.finished.usage.completion_tokens == 0
        stats = engine.stats()
        assert (stats.running, stats.waiting, stats.kv_blocks_used) == (0, 0, 0)
        after = await engine.submit(_req(6)).collect()  # the room is usable again
        assert after.finished.finish_reason.value == "length"


async def test_a_full_batch_queues_and_a_full_queue_refuses(load_tiny) -> None:
    loaded = load_tiny("llama")
    engine = Engine(loaded, EngineConfig(max_batch_size=2, max_queue=3))
    streams = [engine.submit(_req(200)), engine.submit(_req(200)), engine.submit(_req(4))]
    assert engine.stats().waiting == 3
    engine.start()
    assert isinstance(await streams[0].__anext__(), TextDelta)
    stats = engine.stats()  # the long requests fill the batch: the third waits
    assert (stats.running, stats.waiting) == (2, 1)
    streams += [engine.submit(_req(4)), engine.submit(_req(4))]
    with pytest.raises(OverloadedError) as refused:
        engine.submit(_req(4))
    assert refused.value.retry_after > 0
    streams[0].cancel()
    streams[1].cancel()
    results = [await s.collect() for s in streams[2:]]
    assert all(r.finished.finish_reason.value == "length" for r in results)
    engine.shutdown_now()


async def test_requests_that_cannot_fit_are_refused_before_running(load_tiny) -> None:
    loaded = load_tiny("llama")
    prefix = make_prefix(loaded, 8)
    async with running(loaded, max_seq_len=32) as engine:
        with pytest.raises(ContextLengthError):
            engine.submit(EngineRequest([1] * 20, SamplingParams(max_new_tokens=5), prefix))
        ok = engine.submit(EngineRequest([1] * 20, SamplingParams(max_new_tokens=4), prefix))
        assert (await ok.collect()).finished.usage.prefix_tokens == 8
    with pytest.raises(ValueError):
        Engine(loaded, EngineConfig(max_seq_len=loaded.max_context + 1))


@pytest.mark.parametrize(
    "request_",
    [
        EngineRequest(""),
        EngineRequest([]),
        EngineRequest([1, 10**6]),
        EngineRequest([1, -1]),
        EngineRequest([1], SamplingParams(temperature=-0.1)),
        EngineRequest([1], SamplingParams(top_p=0.0)),
        EngineRequest([1], SamplingParams(top_p=1.5)),
        EngineRequest([1], SamplingParams(top_k=-1)),
        EngineRequest([1], SamplingParams(max_new_tokens=0)),
        EngineRequest([1], SamplingParams(stop=("",))),
    ],
)
async def test_invalid_requests_are_refused(load_tiny, request_: EngineRequest) -> None:
    engine = Engine(load_tiny("llama"), EngineConfig(max_batch_size=1))
    with pytest.raises(InvalidRequestError):
        engine.submit(request_)


async def test_a_request_id_in_use_is_refused(load_tiny) -> None:
    engine = Engine(load_tiny("llama"), EngineConfig(max_batch_size=1))
    engine.submit(EngineRequest([1], request_id="same"))
    with pytest.raises(InvalidRequestError):
        engine.submit(EngineRequest([2], request_id="same"))
    engine.shutdown_now()


async def test_a_bad_prefix_fails_alone(load_tiny) -> None:
    loaded = load_tiny("llama")
    good = make_prefix(loaded, 5, seed=1)
    other_model = dataclasses.replace(good.fingerprint, digest="0" * 64)
    wrong_model = dataclasses.replace(make_prefix(loaded, 5, seed=2), fingerprint=other_model)
    bad_shape = dataclasses.replace(  # hidden size 32 instead of 64, unchecked fingerprint
        good, tensors={"p_theta": torch.zeros(2, 5, 32)}, fingerprint=None, content_hash="x"
    )
    async with running(loaded) as engine:
        ok = engine.submit(EngineRequest(PROMPT, SamplingParams(max_new_tokens=6), good))
        bad = [engine.submit(EngineRequest(PROMPT, SamplingParams(), p))
               for p in (wrong_model, bad_shape)]
        results = [await s.collect() for s in bad]
        assert (await ok.collect()).token_ids == reference_greedy(loaded, PROMPT, good, 6)[0]
        assert engine.alive
    for result in results:
        assert result.finished.finish_reason.value == "error"
        assert result.finished.error_type == "incompatible_prefix"
    assert "same shapes, different model" in (results[0].finished.error_message or "")


async def test_a_failure_one_request_causes_fails_that_request_only(load_tiny) -> None:
    loaded = load_tiny("llama")
    def failing(work):
        if any(w.request_id == "boom" for w in work):
            raise RuntimeError("bad input")

    async with running(loaded, step_hook=OnForward(failing)) as engine:
        ok = engine.submit(dataclasses.replace(_req(8), request_id="ok"))
        boom = engine.submit(dataclasses.replace(_req(8), request_id="boom"))
        failed, done = await boom.collect(), await ok.collect()
        assert failed.finished.finish_reason.value == "error"
        assert "bad input" in (failed.finished.error_message or "")
        assert done.token_ids == reference_greedy(loaded, PROMPT, None, 8)[0]
        assert engine.alive and engine.stats().kv_blocks_used == 0


async def test_a_replaced_prefix_never_serves_stale_kv(load_tiny) -> None:
    loaded = load_tiny("llama")
    v1 = make_prefix(loaded, 6, seed=1, name="tone")
    v2 = make_prefix(loaded, 6, seed=2, name="tone")  # same name, new content hash
    async with running(loaded) as engine:
        for source in (v1, v2):
            got = await engine.submit(EngineRequest(PROMPT, _req(6).sampling, source)).collect()
            assert got.token_ids == reference_greedy(loaded, PROMPT, source, 6)[0]
        assert engine.stats().prefix_cache_misses == 2


async def test_a_fatal_error_reaches_every_caller(load_tiny) -> None:
    loaded = load_tiny("llama")
    async with running(loaded, max_batch_size=2) as engine:
        streams = [engine.submit(_req(200)) for _ in range(3)]
        assert isinstance(await streams[0].__anext__(), TextDelta)

        def broken(work):
            raise RuntimeError("device lost")

        engine.step_hook = OnForward(broken)
        for stream in streams:
            done = await asyncio.wait_for(stream.collect(), timeout=30)
            assert done.finished.finish_reason.value == "error"
            assert done.finished.error_type == "engine_dead"
        assert not engine.alive and "device lost" in repr(engine.fatal_error)
        with pytest.raises(FatalEngineError):
            engine.submit(_req())


async def test_shutdown_finishes_or_cancels_everyone(load_tiny) -> None:
    loaded = load_tiny("llama")
    engine = Engine(loaded, EngineConfig())
    engine.start()
    short, long = engine.submit(_req(3)), engine.submit(_req(240))
    await engine.shutdown(grace_s=0.0)
    with pytest.raises(ShuttingDownError):
        engine.submit(_req())
    assert (await long.collect()).finished.finish_reason.value == "cancelled"
    assert (await short.collect()).finished.finish_reason.value in ("length", "cancelled")
    engine = Engine(loaded, EngineConfig())
    engine.start()
    short = engine.submit(_req(3))
    await engine.shutdown(grace_s=30.0)
    assert (await short.collect()).finished.finish_reason.value == "length"


async def test_a_long_prompt_never_stalls_running_streams(load_tiny) -> None:
    loaded = load_tiny("llama")
    engine = Engine(loaded, EngineConfig(max_batch_size=4, max_num_batched_tokens=32))
    log: list[list[tuple[str, int]]] = []  # per step: (request id, tokens)
    engine.step_hook = OnForward(lambda work: log.append([(w.request_id, w.length)
                                                          for w in work]))
    engine.start()
    streaming = engine.submit(dataclasses.replace(_req(60), request_id="stream"))
    assert isinstance(await streaming.__anext__(), TextDelta)
    long = engine.submit(EngineRequest([3] * 200, SamplingParams(max_new_tokens=2),
                                       request_id="long"))
    await long.collect()
    engine.shutdown_now()
    steps = [dict(step) for step in log if any(rid == "long" for rid, _ in step)]
    assert sum(step["long"] for step in steps) == 200 + 1  # the prompt, then one decode
    assert len(steps) == 8  # 200 prompt tokens in chunks of 31 (the budget minus one decode)
    for step in steps:
        assert sum(step.values()) <= 32
        assert step.get("stream") == 1  # the running stream got its token in that step too
