"""The one place errors become HTTP: `{"error": {"type": ..., "message": ...}}` with a status.

The server's tree (`server.errors`) carries status and type; the registry's tree (the only
definition of its classes: not found, conflict, quota exceeded, registry unavailable...) is
mapped onto it here; FastAPI's validation errors become 422 and Starlette's HTTP exceptions keep
their status.
Unknown exceptions are caught by `RequestContextMiddleware` (logged, 500 in the same format).
A streamed failure uses `error_payload` for its `error` event.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from prefix_registry import errors as reg
from server import errors as srv
from server.api.auth import rejection_type
from server.api.schemas import ErrorBody

log = logging.getLogger("prefix_serve.api")

_MakeError = Callable[[str], srv.ServeError]


def _wire(family: type[srv.ServeError], status: int, error_type: str) -> _MakeError:
    """Renders a registry error that has no server class of its own (the registry's class is its
    one definition): an error of the server class of its family (for headers such as
    Retry-After) sent with its own status and type."""

    def make(message: str) -> srv.ServeError:
        error = family(message)
        error.status_code, error.type = status, error_type
        return error

    return make


# Registry error class -> the server error it is sent as (first match in MRO order wins).
_REGISTRY_TO_SERVER: dict[type, _MakeError] = {
    reg.NotFoundError: _wire(srv.RequestError, 404, "not_found"),
    reg.FingerprintMismatchError: srv.IncompatiblePrefixError,
    reg.InvalidPrefixError: srv.ValidationError,
    reg.PrefixTooLargeError: srv.PayloadTooLargeError,
    reg.QuotaExceededError: _wire(srv.PermissionDeniedError, 403, "quota_exceeded"),
    reg.InvalidQuotaError: srv.ValidationError,
    reg.ConflictError: _wire(srv.RequestError, 409, "conflict"),
    reg.CorruptRecordError: srv.CorruptRecordError,
    reg.RegistryUnavailableError: _wire(srv.UnavailableError, 503, "registry_unavailable"),
}
_STATUS_TYPES = {
    400: "invalid_request",
    401: "authentication_error",
    403: "permission_denied",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "overloaded",
    503: "unavailable",
}


def to_serve_error(exc: BaseException) -> srv.ServeError | None:
    """The server error `exc` stands for, or None when it is not one we know."""
    if isinstance(exc, srv.ServeError):
        return exc
    if isinstance(exc, reg.RegistryError):
        for cls in type(exc).__mro__:
            target = _REGISTRY_TO_SERVER.get(cls)
            if target is not None:
                return target(exc.message)
    return None


MAX_MESSAGE_CHARS = 1000  # a last bound on anything echoed from the client


def error_payload(error_type: str, message: str) -> dict[str, Any]:
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + "..."
    return {"error": {"type": error_type, "message": message}}


def serve_error_payload(exc: srv.ServeError) -> dict[str, Any]:
    return error_payload(exc.type, exc.message)


def error_response(exc: srv.ServeError) -> JSONResponse:
    """The JSON response for a server error, with Retry-After / WWW-Authenticate where due."""
    headers: dict[str, str] = {}
    if isinstance(exc, srv.OverloadedError):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    elif isinstance(exc, srv.UnavailableError):
        headers["Retry-After"] = "1"
    elif isinstance(exc, srv.AuthenticationError):
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(serve_error_payload(exc), status_code=exc.status_code, headers=headers)


def internal_error_payload() -> dict[str, Any]:
    return error_payload("internal_error", "internal server error (logged)")


def describe_validation(exc: RequestValidationError) -> str:
    """'body.max_new_tokens: Input should be ...; ...' — what was wrong, where."""
    parts = []
    for err in exc.errors()[:10]:
        where = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg")))
    return "; ".join(parts) or "invalid request"


OPERATOR_TENANT_HINT = (
    " (the operator key acts for tenant 'default' unless a tenant is named: the X-Tenant header "
    "on /generate and /v1/*, ?tenant= on /admin/prefixes, or prefixctl --tenant NAME)"
)


def _with_hint(request: Request, error: srv.ServeError) -> srv.ServeError:
    """A 404 for an operator who named no tenant says how to name one."""
    if error.type == "not_found" and getattr(request.state, "operator_default_tenant", False):
        hinted = copy.copy(error)  # keeps its status and type
        hinted.message = error.message + OPERATOR_TENANT_HINT
        return hinted
    return error


def note_error(request: Request, error_type: str) -> None:
    """Put the error's type on the request's log line (and its `request_errors` metric)."""
    fields = getattr(request.state, "log", None)
    if isinstance(fields, dict):
        fields["error_type"] = error_type


async def _on_serve_error(request: Request, exc: Exception) -> JSONResponse:
    error = to_serve_error(exc)
    if error is None:  # pragma: no cover - handlers are registered for mapped classes only
        raise exc
    if error.status_code >= 500:
        log.warning("request failed: %s: %s", error.type, error.message)
    note_error(request, rejection_type(error))
    return error_response(_with_hint(request, error))


async def _on_validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    note_error(request, srv.ValidationError.type)
    return error_response(srv.ValidationError(describe_validation(exc)))


async def _on_http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    error_type = _STATUS_TYPES.get(exc.status_code, "http_error")
    note_error(request, error_type)
    payload = error_payload(error_type, str(exc.detail))
    return JSONResponse(payload, status_code=exc.status_code, headers=exc.headers)


def install_error_handlers(app: FastAPI) -> None:
    """Render every known failure in the one error format."""
    app.add_exception_handler(srv.ServeError, _on_serve_error)
    app.add_exception_handler(reg.RegistryError, _on_serve_error)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: each listed status (and 422, which any parameter can raise)
    documented with the one error body, replacing FastAPI's default validation schema."""
    return {
        s: {"model": ErrorBody, "description": _STATUS_TYPES.get(s, "error")}
        for s in sorted({*statuses, 422})
    }
