"""The one seam between the HTTP layer and "an engine": the local `Engine` in this process, or
the engine replicas of a Ray Serve deployment (`server/serve_ray/`).

Routes submit an `EngineRequest` and read its events; both implementations refuse a request
before its stream starts (429, 400, 503 raise from `submit`), so a refusal is an HTTP status,
never an error event after a 200.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from server.engine.config import EngineStats
from server.engine.engine import Engine
from server.engine.request import EngineRequest, Event
from server.engine.stream import RequestStream


class EventStream(Protocol):
    """A submitted request's `TextDelta`s, ending with one `Finished`."""

    replica: str | None  # the engine replica serving it; None in a single process

    def __aiter__(self) -> AsyncIterator[Event]: ...

    def cancel(self) -> None:
        """The caller went away: free the request's resources (no-op once finished)."""
        ...


class EngineBackend(Protocol):
    """What the routes, health checks, metrics and shutdown need from the engine side."""

    @property
    def alive(self) -> bool: ...

    @property
    def fatal_error(self) -> BaseException | None: ...

    def start(self) -> None: ...

    async def submit(self, request: EngineRequest) -> EventStream:
        """Queue `request`; raises the engine's refusals (ServeError subclasses)."""
        ...

    def stats(self) -> EngineStats | None:
        """This process's engine counters; None when the engines live elsewhere."""
        ...

    async def shutdown(self, grace_s: float) -> None:
        """Stop admitting, let running requests finish within `grace_s`, cancel the rest."""
        ...


class LocalStream:
    """The local engine's `RequestStream` as an `EventStream`."""

    replica: str | None = None

    def __init__(self, stream: RequestStream) -> None:
        self._stream = stream

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._stream

    def cancel(self) -> None:
        self._stream.cancel()


class LocalBackend:
    """The engine running in this process (the default: no Ray)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @property
    def alive(self) -> bool:
        return self.engine.alive

    @property
    def fatal_error(self) -> BaseException | None:
        return self.engine.fatal_error

    def start(self) -> None:
        self.engine.start()

    async def submit(self, request: EngineRequest) -> EventStream:
        return LocalStream(self.engine.submit(request))

    def stats(self) -> EngineStats | None:
        return self.engine.stats()

    async def shutdown(self, grace_s: float) -> None:
        await self.engine.shutdown(grace_s)
