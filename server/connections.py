"""HTTP connections: uvicorn's httptools protocol with the three limits uvicorn does not have.

uvicorn 0.55 times out idle keep-alive connections (`timeout_keep_alive`, armed only after a
response) and can refuse requests over `limit_concurrency`, but it has no header read timeout,
httptools has no header size cap, and `limit_concurrency` answers 503 to every request, `/health`
included, once the connection count is reached (a liveness probe then restarts a healthy server
under attack) while the idle connections that reached it stay open. So, in a small subclass:

- **Header read timeout** (`--header-timeout-s`): from the moment a connection opens, and again
  from the end of each response, the next request's headers must be complete within the timeout;
  otherwise 408 (if a request had begun) and the connection is closed.
- **Header size cap** (`--max-header-kb`): the request line and headers together; over it, 431
  and close. Complete headers are measured exactly; headers still arriving are bounded by the
  bytes received while the parser reported no progress, so what httptools buffers for one
  connection stays within the cap plus one read.
- **Connection cap** (`--max-connections`, `--max-connections-per-ip`): when a new connection
  would pass the cap, the connection idle the longest (no request in progress: headers not yet
  complete, or kept alive between requests) is closed to make room, as nginx reuses its idle
  keep-alive connections; only when every connection has a request in progress is the new one
  answered 503 `too_many_connections`. A client that opens connections and sends nothing cannot
  keep out a newcomer, such as a liveness probe, whose request arrives at once.

Why httptools, not h11 (whose `h11_max_incomplete_event_size` caps headers by itself): measured
here, h11 costs about 3x more CPU per request and per streamed chunk (~270 us more per request,
~9.5 us more per SSE event), all of it on the event loop every stream shares. The cap above is a
few lines; the errors are the API's JSON format.
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from server.api.errors import error_payload
from server.settings import Settings

log = logging.getLogger("prefix_serve.connections")


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float  # from open / last response to the end of the next request's headers
    max_header_bytes: int  # request line + header lines of one request
    max_connections: int  # open connections in all
    max_connections_per_ip: int | None  # open connections from one client address; None: no cap

    @classmethod
    def of(cls, settings: Settings, max_connections: int) -> ConnectionLimits:
        """The settings' limits, with the connection cap the open-files limit allows."""
        return cls(settings.header_timeout_s, settings.max_header_bytes, max_connections,
                   settings.max_connections_per_ip)


class ConnectionTable:
    """The open connections of one server, and the idle ones in the order they became idle."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.open: set[LimitedHttpProtocol] = set()
        self.idle: OrderedDict[LimitedHttpProtocol, None] = OrderedDict()  # oldest first
        self.per_ip: Counter[str] = Counter()
        self.evicted = 0  # idle connections closed to make room
        self.refused = 0  # connections answered 503 (every other one was busy, or its IP full)

    def admit(self, conn: LimitedHttpProtocol) -> bool:
        """Count a new connection in (closing the longest-idle one if need be), or say no."""
        cap = self.limits.max_connections_per_ip
        if cap is not None and self.per_ip[conn.ip] >= cap:
            return False
        while len(self.open) >= self.limits.max_connections:
            if not self.idle:
                return False
            victim = next(iter(self.idle))
            self.drop(victim)
            victim.evict()
            self.evicted += 1
        self.open.add(conn)
        self.per_ip[conn.ip] += 1
        self.idle[conn] = None
        return True

    def mark_busy(self, conn: LimitedHttpProtocol) -> None:
        self.idle.pop(conn, None)

    def mark_idle(self, conn: LimitedHttpProtocol) -> None:
        if conn in self.open:
            self.idle[conn] = None
            self.idle.move_to_end(conn)

    def drop(self, conn: LimitedHttpProtocol) -> None:
        """Forget a connection (idempotent: eviction and connection_lost both call it)."""
        if conn not in self.open:
            return
        self.open.discard(conn)
        self.idle.pop(conn, None)
        self.per_ip[conn.ip] -= 1
        if self.per_ip[conn.ip] <= 0:
            del self.per_ip[conn.ip]


class _HeadersTooLarge(Exception):
    """Raised from a parser callback to stop parsing; uvicorn turns it into send_400_response."""


class LimitedHttpProtocol(HttpToolsProtocol):
    """One connection; `table` and `limits` are set on the subclass `protocol_class` makes."""

    table: ConnectionTable
    limits: ConnectionLimits

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ip = ""
        self._header_timer: asyncio.TimerHandle | None = None
        self._unparsed = 0  # bytes received while the parser reported no progress
        self._progress = False  # the parser completed headers, body or a message in this read
        self._too_large = False

    # --- the connection's life
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.ip = self.client[0] if self.client else ""
        if not self.table.admit(self):
            self.table.refused += 1
            self._answer(503, "too_many_connections", "the server has too many open connections; "
                         "retry shortly", retry_after=1)
            return
        self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self.table.drop(self)
        self._stop_header_clock()
        super().connection_lost(exc)

    def evict(self) -> None:
        """Closed to make room for a newer connection (it was idle the longest)."""
        self._stop_header_clock()
        if not self.transport.is_closing():
            self.transport.abort()  # idle: nothing to flush, and its descriptor is free at once

    # --- reading
    def data_received(self, data: bytes) -> None:
        self._progress = False
        super().data_received(data)
        if self.transport.is_closing():
            return
        self._unparsed = 0 if self._progress else self._unparsed + len(data)
        if self._unparsed > self.limits.max_header_bytes:
            self._refuse_headers()

    def on_headers_complete(self) -> None:
        self._progress = True
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self.limits.max_header_bytes:
            self._too_large = True
            raise _HeadersTooLarge
        self._stop_header_clock()
        self.table.mark_busy(self)
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._progress = True
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._progress = True
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self._busy():
            self._await_headers()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a parser error, ours to headers over the cap, both in the API's
        error format."""
        if self._too_large:
            self._refuse_headers()
        else:
            self._answer(400, "invalid_request", "malformed HTTP request")

    # --- the header clock
    def _await_headers(self) -> None:
        self._stop_header_clock()
        self._header_timer = self.loop.call_later(self.limits.header_timeout_s,
                                                  self._header_timeout)
        self.table.mark_idle(self)

    def _stop_header_clock(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self._busy():
            return
        if self._unparsed == 0:  # nothing of a request arrived: close, like a keep-alive timeout
            self.transport.close()
            return
        self._answer(408, "request_timeout", "the request headers did not arrive within "
                     f"{self.limits.header_timeout_s:g} s")

    # --- answers
    def _busy(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _refuse_headers(self) -> None:
        if self._busy():  # a response is under way: no room for another one, just close
            self.transport.abort()
            return
        self._answer(431, "headers_too_large", "the request line and headers are over the limit "
                     f"of {self.limits.max_header_bytes} bytes")

    def _answer(self, status: int, error_type: str, message: str,
                retry_after: int | None = None) -> None:
        """Write a whole response and close: the connection is not used again."""
        self._stop_header_clock()
        if not self.transport.is_closing():
            self.transport.write(response_bytes(status, error_type, message, retry_after))
            self.transport.close()


def response_bytes(status: int, error_type: str, message: str,
                   retry_after: int | None = None) -> bytes:
    """A complete HTTP/1.1 response in the API's error format, closing the connection."""
    body = json.dumps(error_payload(error_type, message)).encode()
    lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}",
             "content-type: application/json", f"content-length: {len(body)}",
             "connection: close"]
    if retry_after is not None:
        lines.append(f"retry-after: {retry_after}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body


def protocol_class(limits: ConnectionLimits) -> type[LimitedHttpProtocol]:
    """The protocol class for one server: its connections share one table."""
    table = ConnectionTable(limits)
    return type("ServerHttpProtocol", (LimitedHttpProtocol,), {"table": table, "limits": limits})
