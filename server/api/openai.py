"""OpenAI-compatible routes: `/v1/completions`, `/v1/chat/completions`, `/v1/models[/{id}]`.

`model` names a prefix (`name` or `name@N`, the caller's own) or the base model by the name
`/v1/models` lists; the rest maps onto the same engine call as `/generate`. `/v1/models` lists
only what this server can serve: a prefix made for another base model is left out (the admin
listing marks it).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from prefix_registry import errors as reg
from server.api.deps import EngineDep, GenerationTenant, ServicesDep, StoreDep
from server.api.engine_calls import (
    Generation,
    GenerationCall,
    complete,
    complete_all,
    finished_error,
    start_generation,
    start_generations,
)
from server.api.errors import error_responses
from server.api.openai_chat import default_max_tokens
from server.api.openai_format import ChatFormat, CompletionFormat, batch_stream, openai_stream
from server.api.openai_schemas import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    _OpenAIRequest,
)
from server.api.sse import sse_response
from server.api.state import Services
from server.engine.request import FinishReason, SamplingParams
from server.errors import IncompatiblePrefixError, InvalidRequestError, NotFoundError

router = APIRouter(prefix="/v1", tags=["openai"])
_ERRORS = error_responses(400, 401, 403, 404, 422, 429, 503)
_SSE_DOC = {
    "description": "with `stream: true`: OpenAI-style `data:` chunks ending with `data: [DONE]`",
    "content": {"text/event-stream": {"schema": {"type": "string"}}},
}
MODELS_PAGE = 200


async def bounded_lists(request: Request, services: ServicesDep) -> None:
    """Refuse over-long token-id and message lists before FastAPI validates the body item by
    item: dependencies run after the JSON is parsed (cached on the request) but before the body
    model is validated, and a length is O(1)."""
    try:
        body = await request.json()
    except ValueError:
        return  # not JSON: FastAPI's own parse refuses it
    services.prompts.refuse_long_lists(body)


BoundedLists = Annotated[None, Depends(bounded_lists)]


@router.post("/completions", response_model=CompletionResponse,
             responses={200: _SSE_DOC, **_ERRORS}, summary="OpenAI-compatible text completion")
async def completions(
    body: CompletionRequest, request: Request, tenant: GenerationTenant,
    services: ServicesDep, _engine: EngineDep, _lists: BoundedLists,
) -> JSONResponse | EventSourceResponse:
    body.check_supported()
    sampling = _sampling(body, body.max_tokens or 16)
    prompts = body.prompts()
    if len(prompts) > 1:
        return await _batch(services, request, body, tenant, prompts, sampling)
    call = GenerationCall(tenant, prompts[0], sampling, _prefix_ref(body, services))
    generation = await start_generation(services, request, call)
    fmt = CompletionFormat(generation.id, body.model)
    return await _respond(services, request, body, generation, fmt)


async def _batch(
    services: Services, request: Request, body: CompletionRequest, tenant: str,
    prompts: list[str | list[int]], sampling: SamplingParams,
) -> JSONResponse | EventSourceResponse:
    """A batch of prompts: each its own engine request, all submitted before any is read (so
    they batch in the engine); choices in prompt order, `index` = prompt_index * n + i."""
    limit = services.settings.max_prompts_per_request
    if len(prompts) > limit:
        raise InvalidRequestError(f"prompt: {len(prompts)} prompts; at most {limit} per request "
                                  "(--max-prompts-per-request)")
    prefix_ref = _prefix_ref(body, services)
    calls = [GenerationCall(tenant, prompt, sampling, prefix_ref) for prompt in prompts]
    generations = await start_generations(services, request, calls)
    fmt = CompletionFormat(generations[0].id, body.model)
    headers = generations[0].headers
    if body.stream:
        return sse_response(batch_stream(generations, fmt, body.include_usage), headers,
                            services.settings)
    results = await complete_all(generations, request)
    for _, finished in results:
        if finished.finish_reason is FinishReason.ERROR:
            raise finished_error(finished)
    return JSONResponse(fmt.batch_response(results).model_dump(), headers=headers)


@router.post("/chat/completions", response_model=ChatCompletionResponse,
             responses={200: _SSE_DOC, **_ERRORS}, summary="OpenAI-compatible chat completion")
async def chat_completions(
    body: ChatCompletionRequest, request: Request, tenant: GenerationTenant,
    services: ServicesDep, _engine: EngineDep, _lists: BoundedLists,
) -> JSONResponse | EventSourceResponse:
    body.check_supported()
    prompt_ids = await services.prompts.chat(body.messages, tenant=tenant)
    prefix_ref = _prefix_ref(body, services)
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is None:
        max_tokens = await default_max_tokens(services, tenant, prefix_ref, len(prompt_ids))
    call = GenerationCall(tenant, prompt_ids, _sampling(body, max_tokens), prefix_ref,
                          add_special_tokens=False)
    generation = await start_generation(services, request, call)
    fmt = ChatFormat(generation.id, body.model)
    return await _respond(services, request, body, generation, fmt)


@router.get("/models", response_model=ModelList, responses=error_responses(401, 403, 503),
            summary="The base model and the caller's prefixes this server can use")
async def models(tenant: GenerationTenant, services: ServicesDep, store: StoreDep) -> ModelList:
    cards = [_base_card(services)]
    served = services.loaded.fingerprint
    cursor: str | None = None
    try:
        while True:
            page = await store.list(tenant, limit=MODELS_PAGE, cursor=cursor)
            cards += [ModelCard(id=m.name, created=int(m.created_at), owned_by=tenant)
                      for m in page.items if served.mismatch(m.model) is None]
            if (cursor := page.next_cursor) is None:
                break
    except reg.TenantNotFoundError:
        pass  # e.g. the operator acting for a tenant that has no prefixes yet
    return ModelList(data=cards)


@router.get("/models/{model_id:path}", response_model=ModelCard,
            responses=error_responses(401, 403, 404, 503),
            summary="One model: the base model, or a prefix (`name` or `name@N`) of the caller's")
async def retrieve_model(
    model_id: str, tenant: GenerationTenant, services: ServicesDep, store: StoreDep
) -> ModelCard:
    if services.is_base_model(model_id):
        return _base_card(services)
    try:
        meta = await store.get_meta(tenant, model_id)
    except (reg.NotFoundError, reg.InvalidPrefixError) as exc:
        raise NotFoundError(f"model {model_id!r} not found") from exc
    problem = services.loaded.fingerprint.mismatch(meta.model)
    if problem is not None:
        raise IncompatiblePrefixError(f"prefix {model_id!r} can't be used: {problem}")
    return ModelCard(id=model_id, created=int(meta.created_at), owned_by=tenant)


def _base_card(services: Services) -> ModelCard:
    return ModelCard(id=services.model_name, created=0, owned_by="prefix-serve")


async def _respond(
    services: Services, request: Request, body: _OpenAIRequest, generation: Generation,
    fmt: CompletionFormat | ChatFormat,
) -> JSONResponse | EventSourceResponse:
    if body.stream:
        return sse_response(openai_stream(generation, fmt, body.include_usage),
                            generation.headers, services.settings)
    text, finished = await complete(generation, request)
    if finished.finish_reason is FinishReason.ERROR:
        raise finished_error(finished)
    return JSONResponse(fmt.response(text, finished).model_dump(), headers=generation.headers)


def _prefix_ref(body: _OpenAIRequest, services: Services) -> str | None:
    """None for the base model, else the prefix reference."""
    return None if services.is_base_model(body.model) else body.model


def _sampling(body: _OpenAIRequest, max_tokens: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_tokens, temperature=body.temperature,
                          top_p=body.top_p, seed=body.seed, stop=body.stop_strings())
