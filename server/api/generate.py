"""`POST /generate`: one completion, whole or as Server-Sent Events (docs/http-api.md)."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse, ServerSentEvent

from server.api.deps import EngineDep, GenerationTenant, ServicesDep
from server.api.engine_calls import (
    Generation,
    GenerationCall,
    complete,
    finished_error,
    start_generation,
)
from server.api.errors import error_responses, internal_error_payload, serve_error_payload
from server.api.schemas import (
    DeltaOut,
    GenerateDone,
    GenerateRequest,
    GenerateResponse,
    PrefixRefOut,
    TimingsOut,
    UsageOut,
)
from server.api.sse import sse_event, sse_response
from server.engine.request import Finished, FinishReason, SamplingParams, TextDelta

log = logging.getLogger("prefix_serve.api")
router = APIRouter(tags=["generation"])

_SSE_DOC = {
    "description": "with `stream: true`: `delta` events, then one `done` (or `error`) event",
    "content": {"text/event-stream": {"schema": {"type": "string"}}},
}


@router.post(
    "/generate",
    response_model=GenerateResponse,
    responses={200: _SSE_DOC, **error_responses(400, 401, 403, 404, 422, 429, 503)},
    summary="Generate a completion, optionally with a prefix",
)
async def generate(
    body: GenerateRequest,
    request: Request,
    tenant: GenerationTenant,
    services: ServicesDep,
    _engine: EngineDep,
) -> JSONResponse | EventSourceResponse:
    call = GenerationCall(tenant=tenant, prompt=body.prompt, sampling=sampling_of(body),
                          prefix_ref=body.prefix_id)
    generation = await start_generation(services, request, call)
    if body.stream:
        return sse_response(_sse(generation), generation.headers, services.settings)
    text, finished = await complete(generation, request)
    if finished.finish_reason is FinishReason.ERROR:
        raise finished_error(finished)
    response = GenerateResponse(text=text, **done_of(generation, finished).model_dump())
    return JSONResponse(response.model_dump(), headers=generation.headers)


def sampling_of(body: GenerateRequest) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=body.max_new_tokens, temperature=body.temperature, top_k=body.top_k,
        top_p=body.top_p, seed=body.seed, stop=tuple(body.stop),
    )


def done_of(generation: Generation, finished: Finished) -> GenerateDone:
    prefix = generation.prefix
    return GenerateDone(
        id=generation.id,
        finish_reason=finished.finish_reason.value,
        usage=UsageOut(**vars(finished.usage)),
        prefix=PrefixRefOut(id=prefix.name, version=prefix.version) if prefix else None,
        timings=TimingsOut(**vars(finished.timings)),
    )


async def _sse(generation: Generation) -> AsyncIterator[ServerSentEvent]:
    """delta* then done | error; a disconnect (cancellation here) cancels the engine request."""
    try:
        async for event in generation.events():
            if isinstance(event, TextDelta):
                if event.text:
                    delta = DeltaOut(text=event.text).model_dump_json()
                    yield sse_event(delta, event="delta")
            elif event.finish_reason is FinishReason.ERROR:
                payload = serve_error_payload(finished_error(event))
                yield sse_event(json.dumps(payload), event="error")
            else:
                yield sse_event(done_of(generation, event).model_dump_json(), event="done")
    except Exception:
        log.exception("stream of %s failed", generation.id)
        yield sse_event(json.dumps(internal_error_payload()), event="error")
    finally:
        generation.cancel()
