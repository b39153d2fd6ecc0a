"""Every error the real server produces arrives as its SDK class; real 429s and 503s are retried
(Retry-After honoured, the retry count kept) and then raised; a mid-stream failure raises too."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import torch

import clients
from clients import _client
from server.models.loader import LoadedModel
from tests.api.helpers import prefix_tensors
from tests.clients.conftest import ADMIN_KEY, LiveServer, ServerFactory
from tests.engine.helpers import OnForward


def counting(url: str, key: str | None, **kwargs: Any) -> tuple[clients.PrefixClient, list[str]]:
    """A client whose HTTP requests are recorded (method + path)."""
    seen: list[str] = []
    http = httpx.Client(
        event_hooks={"request": [lambda r: seen.append(f"{r.method} {r.url.path}")]}
    )
    return clients.PrefixClient(url, key, http_client=http, **kwargs), seen


def raises(cls: type[clients.APIStatusError], error_type: str, call: Callable[[], object]) -> Any:
    with pytest.raises(cls) as info:
        call()
    error = info.value
    assert type(error) is cls and error.type == error_type, (type(error), error.type)
    assert error.status_code == cls.status_code and error.message and error.request_id
    return error


def test_client_errors_map_to_their_classes(
    server: LiveServer, client: clients.PrefixClient, loaded: LoadedModel
) -> None:
    raises(clients.AuthenticationError, "authentication_error",
           lambda: list(clients.PrefixClient(server.url, "psk-wrong").list_prefixes()))
    raises(clients.AuthenticationError, "authentication_error",
           lambda: clients.PrefixClient(server.url).generate(None, "hi"))
    raises(clients.PermissionDeniedError, "permission_denied", lambda: client.create_tenant("x"))
    raises(clients.PermissionDeniedError, "permission_denied",
           lambda: list(client.list_prefixes(tenant="someone-else")))
    error = raises(clients.NotFoundError, "not_found",
                   lambda: client.generate("missing", "hi", max_new_tokens=1))
    assert "missing" in error.message
    raises(clients.NotFoundError, "not_found", lambda: client.get_prefix("missing"))
    raises(clients.NotFoundError, "not_found", lambda: client.delete_prefix("missing"))
    raises(clients.BadRequestError, "context_length_exceeded",
           lambda: client.generate(None, "hi", max_new_tokens=100_000))
    raises(clients.UnprocessableEntityError, "validation_error",
           lambda: client.generate(None, "hi", temperature=-1.0))
    raises(clients.UnprocessableEntityError, "validation_error",
           lambda: client.generate("bad name with spaces", "hi"))
    wrong = prefix_tensors(loaded, "kv", prefix_len=2)
    wrong = {k: v[..., :8].contiguous() for k, v in wrong.items()}  # head_dim 8, model has 16
    error = raises(clients.UnprocessableEntityError, "validation_error",
                   lambda: client.upload_prefix("wrong", wrong))
    assert "head_dim" in error.message
    raises(clients.NotFoundError, "not_found", lambda: client.get_prefix("wrong"))


def test_operator_errors(server: LiveServer, admin: clients.PrefixClient) -> None:
    admin.create_tenant("acme")
    raises(clients.ConflictError, "conflict", lambda: admin.create_tenant("acme"))
    raises(clients.NotFoundError, "not_found", lambda: admin.revoke_key("acme", "key-nope"))
    raises(clients.NotFoundError, "not_found", lambda: admin.create_key("nobody"))
    raises(clients.UnprocessableEntityError, "validation_error",
           lambda: admin.create_tenant("no spaces allowed"))


def test_payload_too_large(start_server: ServerFactory) -> None:
    server = start_server(max_upload_mb=0.01)  # 10 KiB
    with clients.PrefixClient(server.url, ADMIN_KEY) as admin:
        big = {"p_theta": torch.zeros(2, 64, 64)}  # 32 KiB of float32
        raises(clients.PayloadTooLargeError, "payload_too_large",
               lambda: admin.upload_prefix("big", big))


def wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def hold_engine(server: LiveServer) -> threading.Event:
    """Fault injection into the real engine: each step's forward waits until the returned gate
    is set (a stalled device), so requests stay running and the queue fills for real."""
    gate = threading.Event()
    server.services.engine.step_hook = OnForward(lambda work: gate.wait(timeout=30))
    return gate


@pytest.fixture
def full_server(start_server: ServerFactory) -> Iterator[tuple[LiveServer, threading.Event]]:
    """One running place, one queue place: a request runs, another waits, so the next is 429."""
    server = start_server(max_batch_size=1, max_queue=1)
    gate = hold_engine(server)
    engine = server.services.engine
    with clients.PrefixClient(server.url, ADMIN_KEY) as admin:
        running = admin.stream(None, "the quick brown fox", max_new_tokens=3)
        wait_until(lambda: engine.stats().running == 1 and engine.stats().waiting == 0)
        waiting = admin.stream(None, "the quick brown fox", max_new_tokens=3)
        wait_until(lambda: engine.stats().waiting == 1)
        try:
            yield server, gate
        finally:
            gate.set()
            running.close()
            waiting.close()


def test_real_429_is_retried_then_raised(
    full_server: tuple[LiveServer, threading.Event], sleeps: list[float]
) -> None:
    server, _ = full_server
    client, seen = counting(server.url, ADMIN_KEY, max_retries=3)
    error = raises(clients.RateLimitError, "overloaded",
                   lambda: client.generate(None, "hi", max_new_tokens=1))
    assert error.retry_after is not None and error.retry_after >= 1
    assert seen == ["POST /generate"] * 4 and sleeps == [error.retry_after] * 3
    sleeps.clear()
    seen.clear()
    raises(clients.RateLimitError, "overloaded",
           lambda: client.stream(None, "hi", max_new_tokens=1, max_retries=0))
    assert seen == ["POST /generate"] and sleeps == []
    assert client.health().status == "ok"  # other calls are unaffected


def test_real_429_then_success_honours_retry_after(
    full_server: tuple[LiveServer, threading.Event], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, gate = full_server
    engine, delays = server.services.engine, []

    def sleep(delay: float) -> None:  # while "sleeping", the stall ends and the queue drains
        delays.append(delay)
        gate.set()
        wait_until(lambda: engine.stats().waiting == 0)

    monkeypatch.setattr(_client, "_sleep", sleep)
    client, seen = counting(server.url, ADMIN_KEY)
    out = client.generate(None, "hi", max_new_tokens=2)
    assert out.usage.completion_tokens >= 1 and out.finish_reason in ("length", "stop")
    assert seen == ["POST /generate"] * 2 and delays == [1.0]  # the server's Retry-After


async def test_real_429_async(
    full_server: tuple[LiveServer, threading.Event], sleeps: list[float]
) -> None:
    server, _ = full_server
    async with clients.AsyncPrefixClient(server.url, ADMIN_KEY) as client:
        with pytest.raises(clients.RateLimitError) as info:
            await client.generate(None, "hi", max_new_tokens=1)
    assert sleeps == [info.value.retry_after] * clients.DEFAULT_MAX_RETRIES


def test_real_503_while_shutting_down(
    server: LiveServer, admin: clients.PrefixClient, sleeps: list[float]
) -> None:
    assert admin.ready().ok
    server.begin_shutdown()
    client, seen = counting(server.url, ADMIN_KEY)
    error = raises(clients.ServiceUnavailableError, "shutting_down",
                   lambda: client.generate(None, "hi", max_new_tokens=1))
    assert seen == ["POST /generate"] * 3 and len(sleeps) == 2
    assert sleeps == [1.0, 1.0]  # the server's Retry-After
    ready = admin.ready()  # a 503 from /ready is an answer, not an error (and not retried)
    assert not ready.ok and ready.status == "shutting_down"
    assert len(sleeps) == 2 and error.response.headers["retry-after"] == "1"


def test_real_503_when_the_registry_is_down(
    start_server: ServerFactory, sleeps: list[float]
) -> None:
    server = start_server(redis_url="redis://127.0.0.1:1/0")  # nothing listens there
    client, seen = counting(server.url, ADMIN_KEY, max_retries=1)
    raises(clients.ServiceUnavailableError, "registry_unavailable",
           lambda: list(client.list_prefixes()))
    assert seen == ["GET /admin/prefixes"] * 2 and len(sleeps) == 1
    ready = client.ready()
    assert not ready.ok and ready.checks["registry"].startswith("unavailable")


def break_engine_after(server: LiveServer, forwards: int) -> None:
    """Fault injection into the real engine: its forward raises a device error after `forwards`
    calls, which kills the engine loop (what a device failure does)."""
    calls = [0]

    def count(work: object) -> None:
        calls[0] += 1
        if calls[0] > forwards:
            raise torch.AcceleratorError("injected device failure")

    server.services.engine.step_hook = OnForward(count)


def test_mid_stream_error_event_raises_mapped_class(
    server: LiveServer, admin: clients.PrefixClient, sleeps: list[float]
) -> None:
    break_engine_after(server, forwards=3)
    stream = admin.stream(None, "the quick brown fox", max_new_tokens=50)
    received = []
    with pytest.raises(clients.ServiceUnavailableError) as info:
        for delta in stream:
            received.append(delta)
    assert received and stream.text == "".join(received)  # it failed after it started
    assert info.value.type == "engine_dead" and info.value.status_code == 503
    assert sleeps == []  # never retried once yielding
    with pytest.raises(RuntimeError, match="not finished"):
        _ = stream.result
    assert not admin.ready().ok
    raises(clients.ServiceUnavailableError, "engine_dead",
           lambda: admin.generate(None, "hi", max_retries=0))


async def test_mid_stream_error_async(
    server: LiveServer, admin: clients.PrefixClient, sleeps: list[float]
) -> None:
    break_engine_after(server, forwards=3)
    async with clients.AsyncPrefixClient(server.url, ADMIN_KEY) as client:
        stream = await client.stream(None, "the quick brown fox", max_new_tokens=50)
        received = []
        with pytest.raises(clients.ServiceUnavailableError) as info:
            async for delta in stream:
                received.append(delta)
    assert received and info.value.type == "engine_dead" and sleeps == []
