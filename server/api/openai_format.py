"""Engine results in OpenAI's shapes: whole responses and `data:` chunks ending with `[DONE]`."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from sse_starlette import ServerSentEvent

from server.api.engine_calls import Generation, finished_error
from server.api.errors import internal_error_payload, serve_error_payload
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
from server.engine.request import Event, Finished, FinishReason, TextDelta, Usage

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


def summed_usage(finished: list[Finished]) -> OpenAIUsage:
    """The usage of a batch of prompts: the sum of each one's."""
    prompt = sum(f.usage.prompt_tokens for f in finished)
    completion = sum(f.usage.completion_tokens for f in finished)
    return OpenAIUsage(prompt_tokens=prompt, completion_tokens=completion,
                       total_tokens=prompt + completion)


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
        return self.batch_response([(text, finished)])

    def batch_response(self, results: list[tuple[str, Finished]]) -> CompletionResponse:
        """One choice per prompt, in prompt order (`index` = prompt_index * n + i, n = 1)."""
        choices = [CompletionChoice(index=i, text=text,
                                    finish_reason=openai_finish(finished.finish_reason))
                   for i, (text, finished) in enumerate(results)]
        return CompletionResponse(id=self.id, created=self.created, model=self.model,
                                  choices=choices, usage=summed_usage([f for _, f in results]))

    def delta(self, text: str, index: int = 0) -> str:
        choice = CompletionChunkChoice(index=index, text=text, finish_reason=None)
        return self._chunk([choice]).model_dump_json()

    def final(self, finished: Finished, index: int = 0) -> str:
        reason = openai_finish(finished.finish_reason)
        choice = CompletionChunkChoice(index=index, text="", finish_reason=reason)
        return self._chunk([choice]).model_dump_json()

    def usage(self, finished: Finished) -> str:
        return self.batch_usage([finished])

    def batch_usage(self, finished: list[Finished]) -> str:
        return self._chunk([], summed_usage(finished)).model_dump_json()

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


async def batch_stream(
    generations: list[Generation], fmt: CompletionFormat, include_usage: bool
) -> AsyncIterator[ServerSentEvent]:
    """A batch of prompts as one stream: each chunk carries its prompt's choice `index`, every
    choice ends with its `finish_reason` chunk, then the summed usage (if asked) and `[DONE]`.
    A failure of any prompt ends the stream with an error chunk and cancels the others."""
    queue: asyncio.Queue[tuple[int, Event | Exception]] = asyncio.Queue()
    readers = [asyncio.ensure_future(_read(i, g, queue)) for i, g in enumerate(generations)]
    finished: dict[int, Finished] = {}
    try:
        while len(finished) < len(generations):
            index, event = await queue.get()
            if isinstance(event, Exception):
                raise event
            if isinstance(event, TextDelta):
                if event.text:
                    yield sse_event(fmt.delta(event.text, index))
            elif event.finish_reason is FinishReason.ERROR:
                yield sse_event(json.dumps(serve_error_payload(finished_error(event))))
                return
            else:
                finished[index] = event
                yield sse_event(fmt.final(event, index))
        if include_usage:
            yield sse_event(fmt.batch_usage(list(finished.values())))
        yield sse_event(DONE)
    except Exception:
        log.exception("stream of %s failed", fmt.id)
        yield sse_event(json.dumps(internal_error_payload()))
    finally:
        for reader in readers:
            reader.cancel()  # each reader cancels its request (a finished one: no-op)


async def _read(index: int, generation: Generation,
                queue: asyncio.Queue[tuple[int, Event | Exception]]) -> None:
    try:
        async for event in generation.events():
            queue.put_nowait((index, event))
    except Exception as exc:  # the stream reports it (an internal error chunk)
        queue.put_nowait((index, exc))
    finally:
        generation.cancel()  # a reader cancelled early (the client hung up) frees its request
