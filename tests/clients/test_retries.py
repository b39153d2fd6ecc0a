"""Retry policy under network faults a real server cannot produce on demand (mock transports),
plus a real refused connection. Real 429s and 503s are in test_client_server.py."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable, Iterator

import httpx
import pytest

import clients

DONE = b'event: done\ndata: {"id": "r", "finish_reason": "length", "usage": ' \
       b'{"prompt_tokens": 1, "completion_tokens": 2, "prefix_tokens": 0}}\n\n'
GENERATION = {"id": "r", "text": "hi", "finish_reason": "length",
              "usage": {"prompt_tokens": 1, "completion_tokens": 1, "prefix_tokens": 0}}
OVERLOADED = {"error": {"type": "overloaded", "message": "queue full"}}
UNAVAILABLE = {"error": {"type": "shutting_down", "message": "bye"}}


Reply = Callable[[httpx.Request], httpx.Response]


def scripted(*replies: Reply | httpx.Response) -> tuple[httpx.MockTransport, list[httpx.Request]]:
    """A transport answering each request with the next reply; the last one repeats."""
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        reply = replies[min(len(seen), len(replies) - 1)]
        seen.append(request)
        return reply(request) if callable(reply) else reply

    return httpx.MockTransport(handle), seen


def raise_(exc: type[httpx.TransportError]) -> Reply:
    def reply(request: httpx.Request) -> httpx.Response:
        raise exc("fault", request=request)
    return reply


def client_for(transport: httpx.BaseTransport, max_retries: int = 2) -> clients.PrefixClient:
    return clients.PrefixClient("http://test", "key", transport=transport, max_retries=max_retries)


def test_429_honours_retry_after_then_succeeds(sleeps: list[float]) -> None:
    transport, seen = scripted(
        httpx.Response(429, json=OVERLOADED, headers={"Retry-After": "2"}),
        httpx.Response(200, json=GENERATION),
    )
    with client_for(transport) as c:
        assert c.generate("p", "x").text == "hi"
    assert len(seen) == 2 and sleeps == [2.0]


def test_retry_after_is_capped(sleeps: list[float]) -> None:
    transport, _ = scripted(
        httpx.Response(429, json=OVERLOADED, headers={"Retry-After": "3600"}),
        httpx.Response(200, json=GENERATION),
    )
    client_for(transport).generate("p", "x")
    assert sleeps == [clients._constants.MAX_RETRY_AFTER]


def test_503_backs_off_exponentially_with_jitter(sleeps: list[float]) -> None:
    transport, seen = scripted(
        httpx.Response(503, json=UNAVAILABLE), httpx.Response(503, json=UNAVAILABLE),
        httpx.Response(200, json=GENERATION),
    )
    client_for(transport).generate("p", "x")
    assert len(seen) == 3
    assert 0.375 <= sleeps[0] <= 0.5 and 0.75 <= sleeps[1] <= 1.0  # 0.5 * 2**n, minus <= 25%


def test_gives_up_after_max_retries(sleeps: list[float]) -> None:
    transport, seen = scripted(httpx.Response(429, json=OVERLOADED, headers={"Retry-After": "1"}))
    with pytest.raises(clients.RateLimitError) as info:
        client_for(transport).generate("p", "x")
    assert len(seen) == 1 + clients.DEFAULT_MAX_RETRIES and info.value.retry_after == 1.0


def test_max_retries_per_client_and_per_call(sleeps: list[float]) -> None:
    transport, seen = scripted(httpx.Response(503, json=UNAVAILABLE))
    client = client_for(transport, max_retries=4)
    with pytest.raises(clients.ServiceUnavailableError):
        client.generate("p", "x")
    assert len(seen) == 5
    seen.clear()
    with pytest.raises(clients.ServiceUnavailableError):
        client.generate("p", "x", max_retries=0)
    assert len(seen) == 1
    seen.clear()
    with pytest.raises(clients.ServiceUnavailableError):
        client.with_options(max_retries=1).list_tenants()
    assert len(seen) == 2


def test_a_dead_engine_is_a_health_answer_not_a_fault(sleeps: list[float]) -> None:
    dead = {"status": "engine_dead", "detail": "dead: RuntimeError('device lost')"}
    transport, seen = scripted(httpx.Response(503, json=dead))
    health = client_for(transport).health()
    assert not health.ok and health.status == "engine_dead" and "device lost" in health.detail
    assert len(seen) == 1 and sleeps == []


@pytest.mark.parametrize("status", [400, 401, 404, 409, 422, 500])
def test_other_errors_are_never_retried(sleeps: list[float], status: int) -> None:
    transport, seen = scripted(
        httpx.Response(status, json={"error": {"type": "t", "message": "m"}})
    )
    with pytest.raises(clients.APIStatusError):
        client_for(transport).generate("p", "x")
    assert len(seen) == 1 and sleeps == []


def test_connection_errors_are_retried(sleeps: list[float]) -> None:
    transport, seen = scripted(
        raise_(httpx.ConnectError), raise_(httpx.ReadTimeout), httpx.Response(200, json=GENERATION)
    )
    assert client_for(transport).generate("p", "x").text == "hi"
    assert len(seen) == 3 and len(sleeps) == 2


def test_timeout_raises_api_timeout_error(sleeps: list[float]) -> None:
    transport, seen = scripted(raise_(httpx.ConnectTimeout))
    with pytest.raises(clients.APITimeoutError):
        client_for(transport).health()
    assert len(seen) == 3


def test_non_idempotent_call_retried_only_if_never_sent(sleeps: list[float]) -> None:
    # create_tenant after a read timeout may have created it: resending would 409.
    transport, seen = scripted(raise_(httpx.ReadTimeout))
    with pytest.raises(clients.APITimeoutError):
        client_for(transport).create_tenant("acme")
    assert len(seen) == 1
    key = {"name": "acme", "key_id": "k", "api_key": "psk-x"}
    transport, seen = scripted(raise_(httpx.ConnectError), httpx.Response(201, json=key))
    assert client_for(transport).create_tenant("acme").key_id == "k"
    assert len(seen) == 2


def stream_body(*chunks: bytes, fault: bool) -> Iterator[bytes]:
    yield from chunks
    if fault:
        raise httpx.ReadError("connection reset")


async def astream_body(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk
    raise httpx.ReadError("connection reset")


def sse(chunks: Iterator[bytes] | AsyncIterator[bytes]) -> httpx.Response:
    return httpx.Response(200, content=chunks, headers={"content-type": "text/event-stream"})


def test_stream_is_retried_before_it_starts(sleeps: list[float]) -> None:
    delta = b'event: delta\ndata: {"text": "ab"}\n\n'
    transport, seen = scripted(
        httpx.Response(503, json=UNAVAILABLE, headers={"Retry-After": "1"}),
        lambda _: sse(stream_body(delta, DONE, fault=False)),
    )
    with client_for(transport).stream("p", "x") as stream:
        assert list(stream) == ["ab"]
    assert stream.result.text == "ab" and stream.result.usage.completion_tokens == 2
    assert len(seen) == 2 and sleeps == [1.0]


def test_stream_is_never_retried_once_it_yielded(sleeps: list[float]) -> None:
    delta = b'event: delta\ndata: {"text": "ab"}\n\n'
    transport, seen = scripted(lambda _: sse(stream_body(delta, fault=True)))
    stream = client_for(transport).stream("p", "x")
    assert next(stream) == "ab"
    with pytest.raises(clients.APIConnectionError):
        next(stream)
    assert len(seen) == 1 and sleeps == [] and stream.text == "ab"


def test_stream_cut_before_done_is_a_connection_error(sleeps: list[float]) -> None:
    delta = b'event: delta\ndata: {"text": "ab"}\n\n'
    transport, _ = scripted(lambda _: sse(stream_body(delta, fault=False)))
    with pytest.raises(clients.APIConnectionError, match="ended before"):
        client_for(transport).stream("p", "x").until_done()


async def test_async_429_then_success_and_stream_fault(sleeps: list[float]) -> None:
    delta = b'event: delta\ndata: {"text": "ab"}\n\n'
    replies = [
        httpx.Response(429, json=OVERLOADED, headers={"Retry-After": "1.5"}),
        httpx.Response(200, json=GENERATION),
    ]
    seen: list[httpx.Request] = []

    async def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if len(seen) <= 2:
            return replies[len(seen) - 1]
        return sse(astream_body(delta))

    async with clients.AsyncPrefixClient("http://test", transport=httpx.MockTransport(handle)) as c:
        assert (await c.generate("p", "x")).text == "hi"
        assert sleeps == [1.5]
        stream = await c.stream("p", "x")
        with pytest.raises(clients.APIConnectionError):
            async for _ in stream:
                pass
    assert len(seen) == 3 and stream.text == "ab"


def test_real_refused_connection_is_retried_then_raised(sleeps: list[float]) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(clients.APIConnectionError) as info:
        clients.PrefixClient(f"http://127.0.0.1:{port}").health()
    assert not isinstance(info.value, clients.APITimeoutError)
    assert len(sleeps) == clients.DEFAULT_MAX_RETRIES
