"""Per-request context: request id, one structured log line, the request counter, last-resort 500.

Pure ASGI (no BaseHTTPMiddleware), so streamed responses pass through untouched and the log line
is written when the last byte has gone. Routes add fields to the line with `annotate(request, ...)`
(tenant, prefix, token counts, timings).
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import internal_error_payload
from server.api.metrics import Metrics

access_log = logging.getLogger("prefix_serve.access")
log = logging.getLogger("prefix_serve.api")

REQUEST_ID_HEADER = "X-Request-ID"
_VALID_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")
_QUIET_PATHS = ("/health", "/ready", "/metrics")


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex}"


def request_id(request: Request) -> str:
    """The id of this HTTP request (the client's X-Request-ID or one made here)."""
    return str(request.state.request_id)


def annotate(request: Request, **fields: Any) -> None:
    """Add fields to this request's log line (and `tenant` to its metrics labels)."""
    request.state.log.update(fields)


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = _incoming_id(scope)
        rid = incoming or new_request_id()
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        state["request_id_generated"] = incoming is None
        state["log"] = {}
        started = time.perf_counter()
        response: dict[str, Any] = {"status": 500, "started": False}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = rid
                response.update(status=message["status"], started=True)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error in %s %s (request %s)", scope["method"],
                          scope["path"], rid)
            response["status"] = 500
            state["log"]["error_type"] = "internal_error"
            if not response["started"]:
                await _send_internal_error(send_with_id)
        finally:
            self._record(scope, rid, int(response["status"]), time.perf_counter() - started)

    def _record(self, scope: Scope, rid: str, status: int, duration: float) -> None:
        fields: dict[str, Any] = scope["state"]["log"]
        route = getattr(scope.get("route"), "path", "unmatched")
        tenant = str(fields.get("tenant", "-"))
        self.metrics.requests.labels(route=route, status=str(status), tenant=tenant).inc()
        if status == 429:
            reason = str(fields.get("error_type", "overloaded"))
            self.metrics.rejected.labels(tenant=tenant, reason=reason).inc()
        if fields.get("error_type"):
            self.metrics.errors.labels(route=route, type=str(fields["error_type"])).inc()
        line = {"request_id": rid, "method": scope["method"], "path": scope["path"],
                "status": status, "duration_s": round(duration, 6), **fields}
        level = logging.DEBUG if scope["path"] in _QUIET_PATHS else logging.INFO
        access_log.log(level, json.dumps(line, default=str))


def _incoming_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            text = value.decode("latin-1")
            return text if _VALID_ID.match(text) else None
    return None


async def _send_internal_error(send: Send) -> None:
    body = json.dumps(internal_error_payload()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 500, "headers": headers})
    await send({"type": "http.response.body", "body": body})
