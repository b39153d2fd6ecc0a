"""Running one generation for a route: resolve the prefix, submit, observe, cancel on disconnect.

Shared by `/generate` and the OpenAI-compatible routes, which differ only in wire format. Metrics
(time to first token, inter-token latency, token counters) and the request's log fields are
recorded here as the events pass, so streamed and non-streamed requests count alike.

Tokens per minute: the request reserves its prompt plus `max_new_tokens` before it is submitted
(server/api/rate_limit.py) and gives back the unused part when its `Finished` event is seen. A
stream whose client hung up is read to its end by a background task, so its tokens are settled
and counted in the per-tenant metrics whether or not anyone reads them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from prefix_registry.errors import RegistryUnavailableError, TenantNotFoundError
from server import errors as srv
from server.api.engine_backend import EventStream
from server.api.middleware import annotate, new_request_id, request_id
from server.api.quotas import Quota
from server.api.rate_limit import Reservation
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

log = logging.getLogger("prefix_serve.api")
REPLICA_HEADER = "X-Prefix-Serve-Replica"
# How long a hung-up stream is read for its end (a cancelled request ends at the engine's next
# step); past it the reservation stays charged in full.
DRAIN_TIMEOUT_S = 300.0
_draining: set[asyncio.Task[None]] = set()  # strong references to the background readers


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
                 stream: EventStream, reservation: Reservation | None = None) -> None:
        self.id = engine_request.request_id
        self.prefix: PrefixSource | None = engine_request.prefix
        self._services = services
        self._request = request
        self._tenant = engine_request.tenant.name
        self._stream = stream
        self._reservation = reservation  # tokens per minute taken at admission
        self._prompt_tokens = len(engine_request.prompt)  # token ids by now
        self._seen = 0  # generated tokens seen in deltas
        self._reading = False  # a route is iterating `events()`
        self.finished: Finished | None = None

    @property
    def headers(self) -> dict[str, str]:
        """Response headers that describe this generation (the replica that serves it)."""
        replica = self._stream.replica
        return {REPLICA_HEADER: replica} if replica else {}

    async def events(self) -> AsyncIterator[Event]:
        """The engine's events, observed for metrics; ends after the `Finished` event."""
        last: float | None = None
        self._reading = True
        try:
            async for event in self._stream:
                if isinstance(event, TextDelta):
                    last = self._observe_delta(event, last)
                else:
                    await self._observe_finished(event)
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            self._reading = False

    def cancel(self) -> None:
        """Free the request's slot (no-op once finished). When no route reads the stream any
        more (a streaming client hung up), a background task reads it to its end, so the
        request's tokens are settled and counted."""
        if self.finished is None:
            self._stream.cancel()
            annotate(self._request, finish_reason=FinishReason.CANCELLED.value)
            if not self._reading:
                self._reading = True
                task = asyncio.ensure_future(self._drain())
                _draining.add(task)
                task.add_done_callback(_draining.discard)

    async def _drain(self) -> None:
        try:
            async with asyncio.timeout(DRAIN_TIMEOUT_S):
                async for event in self._stream:
                    if isinstance(event, TextDelta):
                        self._seen += len(event.token_ids)
                    else:
                        await self._observe_finished(event)
                        return
        except Exception:  # the reservation stays charged: overcharged, never undercharged
            log.exception("reading the end of cancelled request %s failed", self.id)

    def _observe_delta(self, event: TextDelta, last: float | None) -> float:
        now = time.perf_counter()
        self._seen += len(event.token_ids)
        tokens = max(1, len(event.token_ids))
        if last is not None:
            for _ in range(tokens):
                self._services.metrics.inter_token.observe((now - last) / tokens)
        return now

    async def _observe_finished(self, event: Finished) -> None:
        self.finished = event
        usage, tenant = event.usage, self._tenant
        if self._reservation is not None:
            # A lost replica reports no usage: the tokens seen still count.
            used = self._prompt_tokens + max(usage.completion_tokens, self._seen)
            reservation, self._reservation = self._reservation, None
            await self._services.rate_limiter.settle(reservation, used)
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
    """Resolve the prefix, tokenize off the event loop, reserve the tenant's tokens per minute
    and submit; raises 429 (`rate_limited`) and the engine's synchronous errors (429, 400, 503).
    """
    return (await start_generations(services, request, [call]))[0]


async def start_generations(
    services: Services, request: Request, calls: Sequence[GenerationCall]
) -> list[Generation]:
    """Each call its own engine request (a batch of prompts: submitted together, so they batch
    in the engine), all or none: every prompt is resolved, tokenized and checked against the
    context before any is submitted, each reserves its own tokens per minute, and a refusal of
    any (rate limit, the engine's 429/400/503) cancels the ones already submitted and gives back
    what was reserved."""
    quota = await tenant_quota(services, calls[0].tenant)
    base_id = engine_request_id(request)
    specs = [await _engine_request(services, request, call, quota,
                                   base_id if len(calls) == 1 else f"{base_id}-{i}")
             for i, call in enumerate(calls)]
    reservations = await _reserve_all(services, calls[0].tenant, quota, specs)
    generations: list[Generation] = []
    try:
        for spec, reservation in zip(specs, reservations, strict=True):
            stream = await services.backend.submit(spec)
            generations.append(Generation(services, request, spec, stream, reservation))
            reservations[len(generations) - 1] = None  # the generation settles it now
    except BaseException:
        for generation in generations:
            generation.cancel()  # settles its reservation when its end is read
        for reservation in reservations:
            if reservation is not None:  # refused before it ran: nothing was used
                await services.rate_limiter.settle(reservation, 0)
        raise
    replica = generations[0].headers.get(REPLICA_HEADER)
    annotate(request, engine_request_id=generations[0].id,
             **({"replica": replica} if replica else {}))
    return generations


async def _engine_request(services: Services, request: Request, call: GenerationCall,
                          quota: Quota, request_id: str) -> EngineRequest:
    prefix = None
    if call.prefix_ref is not None:
        prefix = await services.resolver.resolve(call.tenant, call.prefix_ref)
        annotate(request, prefix=f"{prefix.name}@{prefix.version}")
    prefix_len = prefix.prefix_len if prefix else 0
    reserved = prefix_len + call.sampling.max_new_tokens
    prompt = call.prompt
    if isinstance(prompt, str):
        prompt = await services.prompts.encode(
            prompt, tenant=call.tenant, add_special_tokens=call.add_special_tokens,
            reserved=reserved)
    if len(prompt) + reserved > services.prompts.context:  # the engine's check, made early
        raise srv.ContextLengthError(
            f"prefix ({prefix_len}) + prompt ({len(prompt)}) + max_new_tokens "
            f"({call.sampling.max_new_tokens}) = {len(prompt) + reserved} tokens exceeds this "
            f"server's context of {services.prompts.context} tokens")
    return EngineRequest(
        prompt=prompt, sampling=call.sampling, prefix=prefix, request_id=request_id,
        add_special_tokens=call.add_special_tokens, tenant=quota.share(call.tenant),
    )


async def _reserve_all(services: Services, tenant: str, quota: Quota,
                       specs: Sequence[EngineRequest]) -> list[Reservation | None]:
    """Each request's prompt + max_new_tokens; if one is refused, the others are given back."""
    reservations: list[Reservation | None] = []
    try:
        for spec in specs:
            tokens = len(spec.prompt) + spec.sampling.max_new_tokens
            reservations.append(
                await services.rate_limiter.reserve(tenant, quota.tokens_per_minute, tokens))
    except BaseException:
        for reservation in reservations:
            if reservation is not None:
                await services.rate_limiter.settle(reservation, 0)
        raise
    return reservations


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


async def complete_all(generations: Sequence[Generation], request: Request
                       ) -> list[tuple[str, Finished]]:
    """`complete` for a batch of prompts: all run to the end; a client that hangs up (or a
    failure reading one) cancels the rest."""
    collectors = [asyncio.ensure_future(_collect(g)) for g in generations]
    everything = asyncio.gather(*collectors)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    first: set[asyncio.Future[Any]] = {everything, watcher}
    try:
        await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not everything.done() or everything.exception() is not None:
            for generation, collector in zip(generations, collectors, strict=True):
                if not collector.done():
                    generation.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    return await everything


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


def finished_error(finished: Finished) -> srv.ServeError:
    """The server error a `Finished(finish_reason=error)` event stands for."""
    cls = finished.error or srv.ServeError
    return cls(finished.error_message or "the request failed")
