"""Engine results in OpenAI's shapes: whole responses and `data:` chunks ending with `[DONE]`."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from sse_starlette import ServerSentEvent

from server.api.errors import internal_error_payload, serve_error_payload
from server.api.generation import Generation, finished_error
from server.api.openai_schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionResponse,
    OpenAIFinish,
    OpenAIUsage,
)
from server.api.sse import sse_event
from server.engine.request import Finished, FinishReason, TextDelta, Usage

log = logging.getLogger("prefix_serve.api")
DONE = "[DONE]"


# A request cut short (shutdown past its grace period, a cancel) reads "abort", as vLLM's OpenAI
# server reports its FinishReason.ABORT (vllm/v1/engine/__init__.py, FINISH_REASON_STRINGS): a
# client that checks for "stop" then sees the text is not a whole answer. ("length" would claim
# max_tokens was reached.) Failures never get here: they are an error body or event.
_OPENAI_FINISH: dict[FinishReason, OpenAIFinish] = {
    FinishReason.STOP: "stop",
    FinishReason.LENGTH: "length",
    FinishReason.CANCELLED: "abort",
}


def openai_finish(reason: FinishReason) -> OpenAIFinish:
    return _OPENAI_FINISH.get(reason, "abort")


def openai_usage(usage: Usage) -> OpenAIUsage:
    return OpenAIUsage(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                       total_tokens=usage.prompt_tokens + usage.completion_tokens)


@dataclass
class CompletionFormat:
    """`/v1/completions` shapes for one request."""

    request_id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def id(self) -> str:
        return f"cmpl-{self.request_id}"

    def response(self, text: str, finished: Finished) -> CompletionResponse:
        choice = CompletionChoice(text=text, finish_reason=openai_finish(finished.finish_reason))
        return CompletionResponse(id=self.id, created=self.created, model=self.model,
                                  choices=[choice], usage=openai_usage(finished.usage))

    def delta(self, text: str) -> str:
        return self._chunk([CompletionChunkChoice(text=text, finish_reason=None)]).model_dump_json()

    def final(self, finished: Finished) -> str:
        reason = openai_finish(finished.finish_reason)
        return self._chunk([CompletionChunkChoice(text="", finish_reason=reason)]).model_dump_json()

    def usage(self, finished: Finished) -> str:
        return self._chunk([], openai_usage(finished.usage)).model_dump_json()

    def _chunk(self, choices: list[CompletionChunkChoice], usage: OpenAIUsage | None = None
               ) -> CompletionChunk:
        return CompletionChunk(id=self.id, created=self.created, model=self.model,
                               choices=choices, usage=usage)


@dataclass
class ChatFormat:
    """`/v1/chat/completions` shapes for one request."""

    request_id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def id(self) -> str:
        return f"chatcmpl-{self.request_id}"

    def response(self, text: str, finished: Finished) -> ChatCompletionResponse:
        choice = ChatChoice(message=AssistantMessage(content=text),
                            finish_reason=openai_finish(finished.finish_reason))
        return ChatCompletionResponse(id=self.id, created=self.created, model=self.model,
                                      choices=[choice], usage=openai_usage(finished.usage))

    def first(self) -> str:
        return self._chunk([ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))])

    def delta(self, text: str) -> str:
        return self._chunk([ChatChunkChoice(delta=ChatDelta(content=text))])

    def final(self, finished: Finished) -> str:
        reason = openai_finish(finished.finish_reason)
        return self._chunk([ChatChunkChoice(delta=ChatDelta(), finish_reason=reason)])

    def usage(self, finished: Finished) -> str:
        return self._chunk([], openai_usage(finished.usage))

    def _chunk(self, choices: list[ChatChunkChoice], usage: OpenAIUsage | None = None) -> str:
        chunk = ChatCompletionChunk(id=self.id, created=self.created, model=self.model,
                                    choices=choices, usage=usage)
        return chunk.model_dump_json(exclude_none=False)


async def openai_stream(
    generation: Generation, fmt: CompletionFormat | ChatFormat, include_usage: bool
) -> AsyncIterator[ServerSentEvent]:
    """OpenAI-style chunks, then `[DONE]`; an error chunk (our error format) instead on failure."""
    try:
        if isinstance(fmt, ChatFormat):
            yield sse_event(fmt.first())
        async for event in generation.events():
            if isinstance(event, TextDelta):
                if event.text:
                    yield sse_event(fmt.delta(event.text))
            elif event.finish_reason is FinishReason.ERROR:
                yield sse_event(json.dumps(serve_error_payload(finished_error(event))))
                return
            else:
                yield sse_event(fmt.final(event))
                if include_usage:
                    yield sse_event(fmt.usage(event))
                yield sse_event(DONE)
    except Exception:
        log.exception("stream of %s failed", generation.id)
        yield sse_event(json.dumps(internal_error_payload()))
    finally:
        generation.cancel()
