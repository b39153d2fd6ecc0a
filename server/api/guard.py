"""Bounded work before a request is trusted: authenticate from the headers, then let the body in
only up to a size limit and a deadline.

FastAPI reads and parses a JSON body before any dependency runs, so without this an
unauthenticated client could make the server read and parse hundreds of megabytes before its 401,
or hold a connection open forever by never finishing its body. Pure ASGI, in front of the
routers: for the routes that need a key (`/generate`, `/v1/*`, `/admin/*`), the `Authorization`
header is checked first (401/403/503 without reading a byte of the body), the declared
`Content-Length` is checked against the route's limit, and the body is counted as it streams in:
past the limit the route fails with 413, and a body not complete within `--body-timeout-s` with
408. An upload also takes one of the concurrent upload slots first (429 `too_many_uploads` when
its tenant's or the server's are all taken), held until its response is done. The principal
found here is what the routes' `PrincipalDep` returns.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.auth import Principal, rejection_type
from server.api.errors import error_response, note_error, to_serve_error
from server.api.uploads import UploadSlots
from server.errors import PayloadTooLargeError, ServeError

PROTECTED = ("/generate", "/v1/", "/admin/")
UPLOAD = ("POST", "/admin/prefixes")  # multipart, with its own (larger) limit
PRINCIPAL = "principal"  # scope["state"] key


class BodyError(HTTPException):
    """Raised from `receive` while the route reads the body; rendered in the error format."""


class RequestGuard:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._uploads: UploadSlots | None = None  # made from the settings on first upload

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        services = _services(scope)
        if scope["type"] != "http" or services is None or not _guarded(scope):
            await self.app(scope, receive, send)  # the router answers 404/405 unread
            return
        try:
            principal = await services.auth.authenticate(_header(scope, b"authorization"))
            limit = _limit(scope, services.settings)
            _check_declared(scope, limit)
            uploader = self._take_upload_slot(scope, services.settings, principal)
        except Exception as exc:
            error = to_serve_error(exc)
            if error is None:
                raise
            await _reject(error, scope, receive, send)
            return
        scope.setdefault("state", {})[PRINCIPAL] = principal
        body = _BoundedBody(receive, limit, services.settings.body_timeout_s)
        try:
            await self.app(scope, body.receive, send)
        finally:
            if uploader is not None and self._uploads is not None:
                self._uploads.give_back(uploader)

    def _take_upload_slot(self, scope: Scope, settings: Any, principal: Principal) -> str | None:
        """For an upload, hold one of the concurrent upload slots (429 when none is free);
        returns whose slot it is, or None for any other request."""
        if (scope["method"], scope["path"].rstrip("/")) != UPLOAD:
            return None
        if self._uploads is None:
            self._uploads = UploadSlots(settings.max_concurrent_uploads,
                                        settings.max_concurrent_uploads_per_tenant)
        uploader = principal.tenant or "(operator)"
        self._uploads.take(uploader)
        return uploader


def principal_of(scope: Scope) -> Principal | None:
    """The principal `RequestGuard` authenticated for this request, if it ran."""
    found = scope.get("state", {}).get(PRINCIPAL)
    return found if isinstance(found, Principal) else None


class _BoundedBody:
    """`receive` that counts body bytes and enforces a deadline until the body is complete."""

    def __init__(self, receive: Receive, limit: int, timeout_s: float) -> None:
        self._receive = receive
        self._limit = limit
        self._deadline = time.monotonic() + timeout_s
        self._timeout_s = timeout_s
        self._received = 0
        self._complete = False

    async def receive(self) -> Message:
        if self._complete:  # afterwards only http.disconnect comes: never time it out
            return await self._receive()
        message = await self._next()
        if message["type"] == "http.request":
            self._received += len(message.get("body", b""))
            if self._received > self._limit:
                raise BodyError(413, _too_large(self._limit))
            self._complete = not message.get("more_body", False)
        return message

    async def _next(self) -> Message:
        remaining = self._deadline - time.monotonic()
        try:
            return await asyncio.wait_for(self._receive(), max(remaining, 0.001))
        except TimeoutError:
            raise BodyError(
                408, f"the request body did not arrive within {self._timeout_s:g} s"
            ) from None


def _services(scope: Scope) -> Any:
    app = scope.get("app")
    return getattr(getattr(app, "state", None), "services", None)


def _guarded(scope: Scope) -> bool:
    """A request to a protected route that exists for its method (else the router refuses it
    without reading the body, and 404/405 say more than a 401 would)."""
    if not scope["path"].startswith(PROTECTED):
        return False
    routes = getattr(scope.get("app"), "routes", ())
    return any(route.matches(scope)[0] is Match.FULL for route in routes)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _limit(scope: Scope, settings: Any) -> int:
    if (scope["method"], scope["path"].rstrip("/")) == UPLOAD:
        return int(settings.max_upload_bytes)
    return int(settings.max_body_bytes)


def _check_declared(scope: Scope, limit: int) -> None:
    declared = _header(scope, b"content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(_too_large(limit))


def _too_large(limit: int) -> str:
    return f"the request body is over the limit of {limit} bytes ({limit / 2**20:g} MiB)"


async def _reject(error: ServeError, scope: Scope, receive: Receive, send: Send) -> None:
    note_error(Request(scope), rejection_type(error))  # typed in the access log and metrics
    await error_response(error)(scope, receive, send)

