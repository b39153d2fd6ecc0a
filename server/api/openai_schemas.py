"""Wire schemas of the OpenAI-compatible routes (the subset prefix-serve supports).

Unknown fields are ignored (OpenAI clients send options we don't model); known options we can't
honour (`n > 1`, `logprobs`, `echo`, `best_of`, `suffix`, penalties, `logit_bias`, tools) are a
400 with the option named, never silently dropped.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from server.api.schemas import (
    MAX_NEW_TOKENS,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_STOP_STRINGS,
    StopString,
    WireOut,
)
from server.errors import InvalidRequestError

MAX_PROMPT_TOKENS = 1_000_000  # a prompt given as token ids
MAX_MESSAGES = 4096
MAX_CHOICES = 128  # `n` and `best_of`: only 1 is served, larger values are a 400 naming them
MAX_PROMPTS = 4096  # prompts in one batch: the schema's ceiling (--max-prompts-per-request binds)
TokenId = Annotated[int, Field(ge=0, lt=2**31)]  # the vocabulary check comes later
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]  # OpenAI's range


def is_unicode(text: str) -> bool:
    """False for text holding a lone surrogate (JSON allows "\\ud800"; UTF-8 cannot carry it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class StreamOptions(BaseModel):
    include_usage: bool = False


class _OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=256,
                       description="a prefix id ('name', 'name@N') or the base model")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopString | list[StopString] | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None
    user: str | None = Field(default=None, max_length=256)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"stop: at most {MAX_STOP_STRINGS} strings")
        return value

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def check_supported(self) -> None:
        """400 for options prefix-serve does not implement."""
        unsupported = {
            "n": self.n != 1,
            "presence_penalty": self.presence_penalty != 0,
            "frequency_penalty": self.frequency_penalty != 0,
            "logit_bias": bool(self.logit_bias),
            "logprobs": self.logprobs not in (None, False, 0),
            **self._more_unsupported(),
        }
        named = [name for name, bad in unsupported.items() if bad]
        if named:
            raise InvalidRequestError(f"unsupported option(s): {', '.join(named)} "
                                      "(only n=1, no penalties, logprobs, echo, best_of, tools)")

    def _more_unsupported(self) -> dict[str, bool]:
        return {}

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_OpenAIRequest):
    # One prompt (text or token ids) or a batch: a list of texts or of token-id lists, each
    # prompt its own engine request (--max-prompts-per-request bounds how many).
    prompt: (
        Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
        | Annotated[list[Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]],
                    Field(min_length=1, max_length=MAX_PROMPTS)]
        | Annotated[list[TokenId], Field(min_length=1, max_length=MAX_PROMPT_TOKENS)]
        | Annotated[list[Annotated[list[TokenId], Field(min_length=1,
                                                        max_length=MAX_PROMPT_TOKENS)]],
                    Field(min_length=1, max_length=MAX_PROMPTS)]
    )
    max_tokens: int | None = Field(default=16, ge=1, le=MAX_NEW_TOKENS)
    echo: bool = False
    best_of: int | None = Field(default=None, ge=1, le=MAX_CHOICES)
    suffix: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)

    def _more_unsupported(self) -> dict[str, bool]:
        return {
            "echo": self.echo,
            "best_of": self.best_of not in (None, 1),
            "suffix": bool(self.suffix),
        }

    def prompts(self) -> list[str | list[int]]:
        """The prompts in order: one, or each of a batch."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if all(isinstance(p, int) for p in prompt):
            return [[int(t) for t in prompt]]  # type: ignore[arg-type]
        return [p if isinstance(p, str) else [int(t) for t in p] for p in prompt]  # type: ignore[union-attr]

    def prompt_value(self) -> str | list[int]:
        """The first prompt (kept for callers that take one)."""
        return self.prompts()[0]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: (
        Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
        | Annotated[list[dict[str, Any]], Field(max_length=MAX_MESSAGES)]
        | None
    ) = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequestError("only text content parts are supported")
            parts.append(part["text"])
        text = "".join(parts)
        if not is_unicode(text):  # the parts are not validated as strings by the schema
            raise InvalidRequestError("message content is not valid Unicode (a lone surrogate)")
        return text


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)
    tools: list[Any] | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    def _more_unsupported(self) -> dict[str, bool]:
        return {"tools": bool(self.tools), "top_logprobs": bool(self.top_logprobs)}


# --- responses ----------------------------------------------------------------------------------
OpenAIFinish = Literal["stop", "length", "abort"]  # abort: cut short (vLLM's word for it)


class OpenAIUsage(WireOut):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(WireOut):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: OpenAIFinish


class CompletionResponse(WireOut):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: OpenAIUsage


class CompletionChunkChoice(WireOut):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: OpenAIFinish | None  # None until the last chunk


class CompletionChunk(WireOut):
    """A streamed `data:` chunk of `/v1/completions` (same shape as the response, as OpenAI's)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: OpenAIUsage | None = None


class AssistantMessage(WireOut):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(WireOut):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: OpenAIFinish


class ChatCompletionResponse(WireOut):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: OpenAIUsage


class ChatDelta(WireOut):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(WireOut):
    index: int = 0
    delta: ChatDelta
    logprobs: None = None
    finish_reason: OpenAIFinish | None = None


class ChatCompletionChunk(WireOut):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: OpenAIUsage | None = None


class ModelCard(WireOut):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(WireOut):
    object: Literal["list"] = "list"
    data: list[ModelCard]
