"""The ingress side of the seam: `EngineBackend` over the engine deployment's handle.

Each request is one streaming call, `handle.options(stream=True, multiplexed_model_id=...)`, so
Ray Serve routes it to a replica that already holds its prefix. The prefix's tensors stay out of
the call: the replica loads them by the model id. A replica that dies before the request's first
token costs nothing but a retry on another replica; after it, the request ends with a 503
`replica_unavailable` in the error format.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from typing import Any

from ray.exceptions import NodeDiedError, ObjectLostError, RayActorError, WorkerCrashedError
from ray.serve.handle import DeploymentHandle

from prefix_registry.errors import RegistryError
from server import errors as srv
from server.api.engine_backend import EventStream
from server.engine.config import EngineStats
from server.engine.request import (
    EngineRequest,
    Event,
    Finished,
    FinishReason,
    TextDelta,
    Timings,
    Usage,
)
from server.serve_ray.messages import Accepted, Refused, prefix_model_id

log = logging.getLogger("prefix_serve.ray")
REPLICA_LOST = (RayActorError, WorkerCrashedError, NodeDiedError, ObjectLostError)
DEFAULT_ATTEMPTS = 5  # one call and up to four retries on other replicas
RETRY_DELAYS_S = (0.1, 0.5, 1.0, 2.0)  # time for the router to learn that the replica is gone


class RayEngineClient:
    """The engine replicas, as the routes see them. Ray restarts dead replicas, so the backend
    as a whole stays alive; a request fails only when no replica takes it."""

    alive = True
    fatal_error: BaseException | None = None

    def __init__(self, handle: DeploymentHandle, attempts: int = DEFAULT_ATTEMPTS) -> None:
        self._handle = handle
        self._attempts = attempts

    def start(self) -> None:
        pass  # Ray Serve started the replicas

    def stats(self) -> EngineStats | None:
        return None  # each replica exports its own (server/serve_ray/metrics.py)

    async def shutdown(self, grace_s: float) -> None:
        pass  # Ray Serve drains each replica within its graceful_shutdown_timeout_s

    async def submit(self, request: EngineRequest) -> EventStream:
        stream = RemoteStream(self, request)
        await stream.open()
        return stream

    async def call(self, request: EngineRequest) -> tuple[Any, str]:
        """One streaming call that a replica accepted: (its generator, the replica's id).
        Raises the replica's refusal, or ReplicaUnavailableError when every attempt found a
        replica dying."""
        options = self._handle.options(stream=True, multiplexed_model_id=prefix_model_id(request))
        bare = dataclasses.replace(request, prefix=None)  # the replica loads it by the model id
        lost: BaseException | None = None
        for attempt in range(self._attempts):
            if attempt:
                await asyncio.sleep(RETRY_DELAYS_S[min(attempt, len(RETRY_DELAYS_S)) - 1])
            generator: Any = options.generate.remote(bare)  # a DeploymentResponseGenerator
            try:
                first = await generator.__anext__()
            except REPLICA_LOST as exc:
                log.warning("an engine replica was lost before request %s started: %s; "
                            "retrying", request.request_id, exc)
                lost = exc
                continue
            if isinstance(first, Refused):
                raise _refusal(first)
            assert isinstance(first, Accepted)
            return generator, first.replica
        raise srv.ReplicaUnavailableError(f"no engine replica could take the request: {lost}")


class RemoteStream:
    """The events of one request on a replica; resubmitted to another replica if its replica is
    lost before the first token."""

    def __init__(self, client: RayEngineClient, request: EngineRequest) -> None:
        self._client = client
        self._request = request
        self._generator: Any = None
        self.replica: str | None = None
        self._finished = False

    async def open(self) -> None:
        self._generator, self.replica = await self._client.call(self._request)

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._events()

    async def _events(self) -> AsyncIterator[Event]:
        started = False  # whether a token went out: then a retry would repeat it
        while True:
            try:
                async for event in self._generator:
                    started = started or isinstance(event, TextDelta)
                    self._finished = isinstance(event, Finished)
                    yield event
                    if self._finished:
                        return
                raise srv.ReplicaUnavailableError("the engine replica ended the stream early")
            except (*REPLICA_LOST, srv.ReplicaUnavailableError) as exc:
                if started or not await self._reopen(exc):
                    self._finished = True
                    yield _lost(exc)
                    return

    async def _reopen(self, exc: BaseException) -> bool:
        log.warning("engine replica %s lost before request %s's first token (%s); retrying",
                    self.replica, self._request.request_id, exc)
        try:
            await self.open()
        except (srv.ServeError, RegistryError):
            return False
        return True

    def cancel(self) -> None:
        if self._generator is not None and not self._finished:
            self._generator.cancel()  # Ray cancels the replica's generator: the engine frees it


def _refusal(refused: Refused) -> srv.ServeError | RegistryError:
    cls = refused.error
    if issubclass(cls, srv.OverloadedError):
        return cls(refused.message, retry_after=refused.retry_after or 1.0)
    return cls(refused.message)


def _lost(exc: BaseException) -> Finished:
    return Finished(
        FinishReason.ERROR, Usage(0, 0, 0), Timings(0.0, None, 0.0),
        error=srv.ReplicaUnavailableError,
        error_message=f"the engine replica serving this request was lost: {exc}",
    )
