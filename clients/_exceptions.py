"""The SDK's one exception tree, mirroring the server's error format.

```
PrefixServeError                      every failure of a call to the server
├── APIConnectionError                no answer from the server (refused, reset, DNS, ...)
│   └── APITimeoutError               connect / read / write / pool timeout
└── APIStatusError                    the server answered {"error": {"type", "message"}}
    ├── BadRequestError               400  invalid_request, context_length_exceeded
    ├── AuthenticationError           401  authentication_error
    ├── PermissionDeniedError         403  permission_denied
    │   └── QuotaExceededError        403  quota_exceeded (the tenant's prefix count or bytes)
    ├── NotFoundError                 404  not_found
    ├── ConflictError                 409  conflict
    ├── PayloadTooLargeError          413  payload_too_large
    ├── UnprocessableEntityError      422  validation_error, incompatible_prefix
    ├── RateLimitError                429  overloaded, tenant_queue_full, rate_limited,
    │                                      too_many_uploads
    │                                      (+ retry_after, seconds)
    ├── InternalServerError           500  (and any other 5xx without a class of its own)
    │   └── CorruptRecordError        500  corrupt_record (a stored record failed its checks)
    └── ServiceUnavailableError       503  unavailable, shutting_down, registry_unavailable,
                                           engine_dead, replica_unavailable
```

Statuses without a class of their own (405 method_not_allowed, 408 request_timeout, 415
unsupported_media_type, 418, ...) raise `APIStatusError` itself.

A local input the SDK cannot send (an upload source that is no prefix file, adapter directory or
tensor dict) raises `clients.UploadSourceError`, a `ValueError`, before any request is made.

Every `APIStatusError` is built by `make_status_error`, for a non-2xx response and for an
`error` event in the middle of a stream alike (there the class comes from the error's `type`,
since the HTTP status was already 200).
"""

from __future__ import annotations

import time
from email.utils import parsedate_to_datetime

import httpx

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "ConflictError",
    "CorruptRecordError",
    "InternalServerError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "PrefixServeError",
    "QuotaExceededError",
    "RateLimitError",
    "ServiceUnavailableError",
    "UnprocessableEntityError",
    "make_status_error",
]


class PrefixServeError(Exception):
    """Base of every error of a call to the server."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class APIConnectionError(PrefixServeError):
    """The request got no HTTP answer (connection refused or reset, DNS failure, ...)."""

    def __init__(self, message: str = "connection error", *, request: httpx.Request | None = None):
        super().__init__(message)
        self.request = request


class APITimeoutError(APIConnectionError):
    """Connecting, sending or waiting for the answer took longer than the timeout."""

    def __init__(self, message: str = "request timed out", *, request: httpx.Request | None = None):
        super().__init__(message, request=request)


class APIStatusError(PrefixServeError):
    """The server answered with an error: `{"error": {"type": ..., "message": ...}}`.

    Attributes:
        status_code: the HTTP status (for a mid-stream error: the status its `type` maps to).
        type: the server's machine-readable error type, e.g. "not_found".
        message: the server's human-readable message.
        response: the HTTP response the error came with.
        request_id: the server's `X-Request-ID` for this request, if it sent one.
    """

    status_code: int = 0

    def __init__(
        self, message: str, *, status_code: int, type: str, response: httpx.Response
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.type = type
        self.response = response
        self.request_id: str | None = response.headers.get("x-request-id")

    def __str__(self) -> str:
        return f"{self.type}: {self.message}"


class BadRequestError(APIStatusError):
    status_code = 400


class AuthenticationError(APIStatusError):
    status_code = 401


class PermissionDeniedError(APIStatusError):
    status_code = 403


class QuotaExceededError(PermissionDeniedError):
    """An upload would take the tenant past its prefix count or stored bytes quota."""


class NotFoundError(APIStatusError):
    status_code = 404


class ConflictError(APIStatusError):
    status_code = 409


class PayloadTooLargeError(APIStatusError):
    status_code = 413


class UnprocessableEntityError(APIStatusError):
    status_code = 422


class RateLimitError(APIStatusError):
    """The server is overloaded (429); `retry_after` is its `Retry-After` in seconds, if sent."""

    status_code = 429

    def __init__(
        self, message: str, *, status_code: int, type: str, response: httpx.Response
    ) -> None:
        super().__init__(message, status_code=status_code, type=type, response=response)
        self.retry_after = parse_retry_after(response.headers)


class InternalServerError(APIStatusError):
    status_code = 500


class CorruptRecordError(InternalServerError):
    """A record the server read back from its registry is inconsistent: the server's data, not
    the request, is at fault; retrying does not help until an operator fixes the record."""


class ServiceUnavailableError(APIStatusError):
    status_code = 503


_BY_STATUS: dict[int, type[APIStatusError]] = {
    cls.status_code: cls
    for cls in (
        BadRequestError, AuthenticationError, PermissionDeniedError, NotFoundError, ConflictError,
        PayloadTooLargeError, UnprocessableEntityError, RateLimitError, InternalServerError,
        ServiceUnavailableError,
    )
}

# Types with a class of their own (a subclass of their status's class).
_BY_TYPE: dict[str, type[APIStatusError]] = {
    "quota_exceeded": QuotaExceededError, "corrupt_record": CorruptRecordError,
}

# For errors that arrive without a meaningful HTTP status (an SSE `error` event after a 200).
_STATUS_BY_TYPE: dict[str, int] = {
    "invalid_request": 400, "context_length_exceeded": 400, "authentication_error": 401,
    "permission_denied": 403, "not_found": 404, "conflict": 409, "payload_too_large": 413,
    "validation_error": 422, "incompatible_prefix": 422, "overloaded": 429,
    "tenant_queue_full": 429, "rate_limited": 429, "too_many_uploads": 429, "quota_exceeded": 403,
    "method_not_allowed": 405, "request_timeout": 408, "unsupported_media_type": 415,
    "internal_error": 500, "corrupt_record": 500, "unavailable": 503, "shutting_down": 503,
    "registry_unavailable": 503, "engine_dead": 503, "replica_unavailable": 503,
}


def make_status_error(
    response: httpx.Response, body: object, *, status_code: int | None = None
) -> APIStatusError:
    """Build the exception for an error `body` that came with `response`.

    `status_code` defaults to the response's; an error inside a 200 stream passes none, and the
    status then comes from the error's `type` (500 when the type is unknown).
    """
    error_type, message = _error_fields(body, response)
    if status_code is None:
        status_code = response.status_code
    if 200 <= status_code < 300:
        status_code = _STATUS_BY_TYPE.get(error_type, 500)
    cls = _BY_TYPE.get(error_type)
    if cls is None or cls.status_code != status_code:
        cls = _BY_STATUS.get(status_code)
    if cls is None:
        cls = InternalServerError if status_code >= 500 else APIStatusError
    return cls(message, status_code=status_code, type=error_type, response=response)


def _error_fields(body: object, response: httpx.Response) -> tuple[str, str]:
    """(type, message) from `{"error": {"type", "message"}}`, or a fallback for other bodies."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("type"), str):
        return error["type"], str(error.get("message", ""))
    reason = response.reason_phrase or "error"
    text = body if isinstance(body, str) else ""
    return "http_error", f"HTTP {response.status_code} {reason}: {text[:200]}".rstrip(": ")


def parse_retry_after(headers: httpx.Headers) -> float | None:
    """Seconds from a `Retry-After` header (delta-seconds or an HTTP date), or None."""
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def make_connection_error(exc: httpx.TransportError) -> APIConnectionError:
    """The SDK's error for an httpx transport failure (a timeout becomes `APITimeoutError`)."""
    request = _request_of(exc)
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        return APITimeoutError(f"request timed out ({detail})", request=request)
    return APIConnectionError(f"connection error ({detail})", request=request)


def _request_of(exc: httpx.TransportError) -> httpx.Request | None:
    try:
        return exc.request
    except RuntimeError:  # httpx raises when the error was made without a request
        return None
