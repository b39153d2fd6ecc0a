"""The one mapping from the server's error format to the SDK's classes (the real server's errors
are checked end to end in test_client_server.py; these are the cases it cannot produce)."""

from __future__ import annotations

import email.utils
import time

import httpx
import pytest

import clients
from clients._exceptions import make_connection_error, make_status_error, parse_retry_after

REQUEST = httpx.Request("GET", "http://test/x")


def error_response(status: int, body: object, **headers: str) -> httpx.Response:
    if isinstance(body, str):
        return httpx.Response(status, text=body, headers=headers, request=REQUEST)
    return httpx.Response(status, json=body, headers=headers, request=REQUEST)


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, clients.BadRequestError), (401, clients.AuthenticationError),
        (403, clients.PermissionDeniedError), (404, clients.NotFoundError),
        (409, clients.ConflictError), (413, clients.PayloadTooLargeError),
        (422, clients.UnprocessableEntityError), (429, clients.RateLimitError),
        (500, clients.InternalServerError), (503, clients.ServiceUnavailableError),
    ],
)
def test_each_status_has_its_class(status: int, cls: type[clients.APIStatusError]) -> None:
    body = {"error": {"type": "some_type", "message": "went wrong"}}
    response = error_response(status, body, **{"X-Request-ID": "req-1"})
    error = make_status_error(response, response.json())
    assert type(error) is cls
    assert (error.status_code, error.type, error.message) == (status, "some_type", "went wrong")
    assert error.request_id == "req-1" and error.response is response
    assert str(error) == "some_type: went wrong"
    assert isinstance(error, clients.APIStatusError | clients.PrefixServeError)


def test_rate_limit_carries_retry_after() -> None:
    body = {"error": {"type": "overloaded", "message": "queue full"}}
    response = error_response(429, body, **{"Retry-After": "3"})
    error = make_status_error(response, response.json())
    assert isinstance(error, clients.RateLimitError) and error.retry_after == 3.0


def test_quota_types_map_to_their_classes() -> None:
    quota = error_response(403, {"error": {"type": "quota_exceeded", "message": "full"}})
    error = make_status_error(quota, quota.json())
    assert type(error) is clients.QuotaExceededError
    assert isinstance(error, clients.PermissionDeniedError)
    denied = error_response(403, {"error": {"type": "permission_denied", "message": "no"}})
    assert type(make_status_error(denied, denied.json())) is clients.PermissionDeniedError
    odd = error_response(400, {"error": {"type": "quota_exceeded", "message": "?"}})
    assert type(make_status_error(odd, odd.json())) is clients.BadRequestError  # status wins
    for error_type in ("rate_limited", "tenant_queue_full"):  # inside a 200 stream
        stream = httpx.Response(200, request=REQUEST)
        error = make_status_error(stream, {"error": {"type": error_type, "message": "wait"}})
        assert type(error) is clients.RateLimitError and error.status_code == 429


def test_a_proxy_error_page_still_maps() -> None:
    response = error_response(502, "<html>Bad Gateway</html>")
    error = make_status_error(response, response.text)
    assert type(error) is clients.InternalServerError and error.status_code == 502
    assert error.type == "http_error" and "Bad Gateway" in error.message
    teapot = error_response(418, {"detail": "no"})
    assert type(make_status_error(teapot, teapot.json())) is clients.APIStatusError


@pytest.mark.parametrize(
    ("error_type", "cls", "status"),
    [
        ("not_found", clients.NotFoundError, 404),
        ("context_length_exceeded", clients.BadRequestError, 400),
        ("incompatible_prefix", clients.UnprocessableEntityError, 422),
        ("engine_dead", clients.ServiceUnavailableError, 503),
        ("shutting_down", clients.ServiceUnavailableError, 503),
        ("something_new", clients.InternalServerError, 500),
    ],
)
def test_mid_stream_error_maps_by_type(error_type: str, cls: type, status: int) -> None:
    # An SSE `error` event arrives inside a 200 response: the class comes from the type.
    response = httpx.Response(200, request=REQUEST)
    body = {"error": {"type": error_type, "message": "m"}}
    error = make_status_error(response, body, status_code=None)
    assert type(error) is cls and error.status_code == status and error.type == error_type


def test_retry_after_forms() -> None:
    assert parse_retry_after(httpx.Headers({"Retry-After": "2.5"})) == 2.5
    assert parse_retry_after(httpx.Headers({"Retry-After": "-4"})) == 0.0
    assert parse_retry_after(httpx.Headers({})) is None
    assert parse_retry_after(httpx.Headers({"Retry-After": "soon"})) is None
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    seconds = parse_retry_after(httpx.Headers({"Retry-After": date}))
    assert seconds is not None and 25 <= seconds <= 31


def test_connection_errors() -> None:
    timeout = make_connection_error(httpx.ReadTimeout("slow", request=REQUEST))
    assert type(timeout) is clients.APITimeoutError and timeout.request is REQUEST
    refused = make_connection_error(httpx.ConnectError("refused"))
    assert type(refused) is clients.APIConnectionError and refused.request is None
    assert isinstance(timeout, clients.APIConnectionError)
