"""Running one generation for a route: resolve the prefix, submit, observe, cancel on disconnect.

Shared by `/generate` and the OpenAI-compatible routes, which differ only in wire format. Metrics
(time to first token, inter-token latency, token counters) and the request's log fields are
recorded here as the events pass, so streamed and non-streamed requests count alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.requests import Request

from prefix_registry.errors import RegistryUnavailableError, TenantNotFoundError
from server import errors as srv
from server.api.backend import EventStream
from server.api.middleware import annotate, new_request_id, request_id
from server.api.quotas import Quota
from server.api.state import Services
from server.engine.request import (
    EngineRequest,
    Event,
    Finished,
    FinishReason,
    PrefixSource,
    SamplingParams,
    TextDelta,
)

REPLICA_HEADER = "X-Prefix-Serve-Replica"


@dataclass(frozen=True)
class GenerationCall:
    """What a route asks for, already validated."""

    tenant: str
    prompt: str | list[int]
    sampling: SamplingParams
    prefix_ref: str | None = None  # "name" | "name@N" | None (the base model)
    add_special_tokens: bool = True


class Generation:
    """One submitted request: its event stream plus what the routes report about it."""

    def __init__(self, services: Services, request: Request, engine_request: EngineRequest,
                 stream: EventStream) -> None:
        self.id = engine_request.request_id
        self.prefix: PrefixSource | None = engine_request.prefix
        self._services = services
        self._request = request
        self._tenant = engine_request.tenant.name
        self._stream = stream
        self._charged = 0  # generated tokens counted against the tenant's tokens per minute
        self.finished: Finished | None = None

    @property
    def headers(self) -> dict[str, str]:
        """Response headers that describe this generation (the replica that serves it)."""
        replica = self._stream.replica
        return {REPLICA_HEADER: replica} if replica else {}

    async def events(self) -> AsyncIterator[Event]:
        """The engine's events, observed for metrics; ends after the `Finished` event."""
        last: float | None = None
        async for event in self._stream:
            if isinstance(event, TextDelta):
                last = self._observe_delta(event, last)
            else:
                self._observe_finished(event)
            yield event
            if isinstance(event, Finished):
                return

    def cancel(self) -> None:
        """Free the request's slot (no-op once finished)."""
        if self.finished is None:
            self._stream.cancel()
            annotate(self._request, finish_reason=FinishReason.CANCELLED.value)

    def _observe_delta(self, event: TextDelta, last: float | None) -> float:
        now = time.perf_counter()
        self._services.rate_limiter.charge(self._tenant, len(event.token_ids))
        self._charged += len(event.token_ids)
        tokens = max(1, len(event.token_ids))
        if last is not None:
            for _ in range(tokens):
                self._services.metrics.inter_token.observe((now - last) / tokens)
        return now

    def _observe_finished(self, event: Finished) -> None:
        self.finished = event
        usage, tenant = event.usage, self._tenant
        self._services.rate_limiter.charge(
            tenant, usage.prompt_tokens + max(0, usage.completion_tokens - self._charged))
        self._services.metrics.finished(tenant, usage, event.timings)
        annotate(
            self._request, finish_reason=event.finish_reason.value,
            prompt_tokens=event.usage.prompt_tokens,
            completion_tokens=event.usage.completion_tokens,
            prefix_tokens=event.usage.prefix_tokens, queue_s=round(event.timings.queue_s, 6),
            ttft_s=event.timings.ttft_s, total_s=round(event.timings.total_s, 6),
            **({"error_type": event.error_type} if event.error_type else {}),
        )


async def start_generation(
    services: Services, request: Request, call: GenerationCall
) -> Generation:
    """Check the tenant's tokens per minute, resolve the prefix, tokenize off the event loop and
    submit; raises 429 (`rate_limited`) and the engine's synchronous errors (429, 400, 503)."""
    quota = await tenant_quota(services, call.tenant)
    services.rate_limiter.check(call.tenant, quota.tokens_per_minute)
    prefix = None
    if call.prefix_ref is not None:
        prefix = await services.resolver.resolve(call.tenant, call.prefix_ref)
        annotate(request, prefix=f"{prefix.name}@{prefix.version}")
    prompt = call.prompt
    if isinstance(prompt, str):
        reserved = (prefix.prefix_len if prefix else 0) + call.sampling.max_new_tokens
        prompt = await services.prompts.encode(
            prompt, add_special_tokens=call.add_special_tokens, reserved=reserved)
    engine_request = EngineRequest(
        prompt=prompt, sampling=call.sampling, prefix=prefix,
        request_id=engine_request_id(request), add_special_tokens=call.add_special_tokens,
        tenant=quota.share(call.tenant),
    )
    stream = await services.backend.submit(engine_request)
    generation = Generation(services, request, engine_request, stream)
    annotate(request, engine_request_id=generation.id,
             **({"replica": stream.replica} if stream.replica else {}))
    return generation


async def tenant_quota(services: Services, tenant: str) -> Quota:
    """The quota in force for `tenant`. The server's defaults when there is none to read: the
    operator acting as `default` without such a tenant, or a tenant not seen since the server
    started while the registry is unreachable (generation goes on without the registry)."""
    try:
        return await services.quotas.get(tenant)
    except (TenantNotFoundError, RegistryUnavailableError):
        return services.quotas.defaults


def engine_request_id(request: Request) -> str:
    """The HTTP request id when this server made it; a fresh one when the client chose it."""
    if request.state.request_id_generated:
        return request_id(request)
    return new_request_id()


async def complete(generation: Generation, request: Request) -> tuple[str, Finished]:
    """Run to the end (non-streamed); a client that hangs up cancels the request."""
    collector = asyncio.ensure_future(_collect(generation))
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({collector, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not collector.done():
            generation.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    return await collector


async def _collect(generation: Generation) -> tuple[str, Finished]:
    parts: list[str] = []
    async for event in generation.events():
        if isinstance(event, TextDelta):
            parts.append(event.text)
        else:
            return "".join(parts), event
    raise srv.FatalEngineError("the engine ended a request without finishing it")


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def error_class(error_type: str) -> type[srv.ServeError]:
    """The ServeError subclass of this `type` (the base class for an unknown one)."""
    return _ERROR_TYPES.get(error_type, srv.ServeError)


def finished_error(finished: Finished) -> srv.ServeError:
    """The server error a `Finished(finish_reason=error)` event stands for."""
    cls = error_class(finished.error_type or "")
    return cls(finished.error_message or "the request failed")


def _error_classes(root: type[srv.ServeError]) -> dict[str, type[srv.ServeError]]:
    table = {root.type: root}
    for sub in root.__subclasses__():
        table.update(_error_classes(sub))
    return table


_ERROR_TYPES = _error_classes(srv.ServeError)
