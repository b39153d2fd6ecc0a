"""What callers hand to the engine thread: an inbox under one lock, and what callers check.

`submit`, `cancel` and `shutdown` run on the callers' threads and touch only this object; the
engine thread takes the inbox at each step and reports admissions and departures back, so the
queue caps and the request-id check stay exact. The alive and closing flags share the lock with
the inbox, so no request slips in after the engine died or began to shut down.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass

from server.engine.request import Request, Status
from server.engine.stream import RequestStream
from server.errors import (
    FatalEngineError,
    InvalidRequestError,
    OverloadedError,
    ShuttingDownError,
    TenantQueueFullError,
)


@dataclass(frozen=True)
class Submit:
    """A new request and the stream its events go to."""

    request: Request
    stream: RequestStream


@dataclass(frozen=True)
class Cancel:
    """The caller gave up: finish the request (no-op when it already finished)."""

    request_id: str


@dataclass(frozen=True)
class Release:
    """The output thread ended the request (a stop string): free what it holds."""

    request_id: str


@dataclass(frozen=True)
class Stop:
    """Cancel everything and stop the engine thread."""


Message = Submit | Cancel | Release | Stop  # what the engine thread's inbox holds


class Intake:
    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue
        self.wake = threading.Event()  # set whenever the inbox gets something
        self.alive = True
        self.fatal_error: BaseException | None = None
        self._lock = threading.Lock()  # guards everything below
        self._items: list[Message] = []
        self._ids: set[str] = set()  # ids of requests not yet finished
        self._queued: Counter[str] = Counter()  # tenant -> submitted, never admitted yet
        self._closing = False

    @property
    def queued(self) -> int:
        """Requests submitted and not yet admitted."""
        return self._queued.total()

    def check_open(self) -> None:
        if not self.alive:
            raise FatalEngineError(f"the engine is dead: {self.fatal_error!r}")
        if self._closing:
            raise ShuttingDownError("the server is shutting down")

    def submit(self, message: Submit) -> None:
        """Queue a new request unless a cap or its request id refuses it."""
        request = message.request
        tenant = request.tenant
        with self._lock:
            self.check_open()
            if self._queued.total() >= self.max_queue:
                raise OverloadedError("the engine's queue is full; retry shortly", retry_after=1.0)
            if tenant.max_queued is not None and self._queued[tenant.name] >= tenant.max_queued:
                raise TenantQueueFullError(
                    f"tenant {tenant.name!r} already has {tenant.max_queued} requests queued "
                    "(its quota); retry shortly", retry_after=1.0,
                )
            if request.request_id in self._ids:
                raise InvalidRequestError(f"request id {request.request_id!r} is already in use")
            self._ids.add(request.request_id)
            self._queued[tenant.name] += 1
            self._items.append(message)
        self.wake.set()

    def post(self, message: Cancel | Release | Stop) -> None:
        with self._lock:
            self._items.append(message)
        self.wake.set()

    def take(self) -> list[Message]:
        with self._lock:
            items, self._items = self._items, []
        return items

    @property
    def pending(self) -> bool:
        return bool(self._items)

    def admitted(self, requests: list[Request]) -> None:
        """These requests ran for the first time: they no longer count as queued."""
        if requests:
            with self._lock:
                for request in requests:
                    self._queued[request.tenant.name] -= 1

    def left(self, request: Request) -> None:
        """`request` finished, running or not; its id is free again."""
        with self._lock:
            self._ids.discard(request.request_id)
            if request.status is Status.WAITING and request.admitted_at is None:
                self._queued[request.tenant.name] -= 1

    def close(self) -> None:
        with self._lock:
            self._closing = True

    def kill(self, exc: BaseException) -> None:
        with self._lock:
            self.alive, self.fatal_error = False, exc
