"""Server-Sent Events: a line decoder, and the generation streams built on it.

`POST /generate` with `"stream": true` answers `event: delta` (`{"text": ...}`) events, then
exactly one `event: done` (the non-streamed response without `text`) or one `event: error`
(`{"error": {"type", "message"}}`). Iterating a `GenerationStream` yields the delta texts;
`.result` is the full `Generation` once `done` arrived; an `error` event raises the mapped
`APIStatusError` subclass.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx

from clients._exceptions import APIConnectionError, make_connection_error, make_status_error
from clients._types import Generation


@dataclass(frozen=True)
class ServerSentEvent:
    event: str  # "message" when the server named none
    data: str
    id: str | None = None

    def json(self) -> Any:
        return json.loads(self.data)


class SSEDecoder:
    """Feeds lines (without their line ending) and returns each event a blank line completes.

    Follows the WHATWG rules: `:` starts a comment, one space after the colon is dropped, several
    `data` lines join with newlines, an event with no data is not dispatched, and an event that
    the end of the stream cuts off is discarded.
    """

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []
        self._last_id: str | None = None

    def feed(self, line: str) -> ServerSentEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            self._event = value
        elif field == "data":
            self._data.append(value)
        elif field == "id" and "\0" not in value:
            self._last_id = value
        return None  # "retry" and unknown fields are ignored

    def _dispatch(self) -> ServerSentEvent | None:
        event, data = self._event or "message", self._data
        self._event, self._data = "", []
        if not data:
            return None
        return ServerSentEvent(event=event, data="\n".join(data), id=self._last_id)


def iter_sse(lines: Iterable[str]) -> Iterator[ServerSentEvent]:
    decoder = SSEDecoder()
    for line in lines:
        event = decoder.feed(line)
        if event is not None:
            yield event


async def aiter_sse(lines: AsyncIterator[str]) -> AsyncIterator[ServerSentEvent]:
    decoder = SSEDecoder()
    async for line in lines:
        event = decoder.feed(line)
        if event is not None:
            yield event


class _StreamState:
    """What both stream flavours share: the deltas so far and the final result."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.deltas: list[str] = []
        self.result: Generation | None = None

    def apply(self, sse: ServerSentEvent) -> str | None:
        """The delta text `sse` carries, if any; records `done`; raises on `error`."""
        if sse.event == "delta":
            text = str(sse.json()["text"])
            self.deltas.append(text)
            return text
        if sse.event == "done":
            self.result = Generation.model_validate({**sse.json(), "text": "".join(self.deltas)})
        elif sse.event == "error":
            raise make_status_error(self.response, _json_or_text(sse.data), status_code=None)
        return None  # unknown event types are skipped, for forward compatibility

    def check_finished(self) -> None:
        if self.result is None:
            raise APIConnectionError(
                "the stream ended before its final event", request=self.response.request
            )


class _StreamBase:
    def __init__(self, response: httpx.Response) -> None:
        self._state = _StreamState(response)

    @property
    def response(self) -> httpx.Response:
        return self._state.response

    @property
    def text(self) -> str:
        """The text received so far."""
        return "".join(self._state.deltas)

    @property
    def result(self) -> Generation:
        """The finished generation (text, finish_reason, usage, prefix, timings, id)."""
        if self._state.result is None:
            raise RuntimeError("the stream has not finished yet: iterate it to the end first")
        return self._state.result


class GenerationStream(_StreamBase):
    """An open streamed generation: iterate for `str` deltas, then read `.result`.

    Use it as a context manager (or iterate it to the end) so its connection is released.
    """

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(response)
        self._iterator = self._deltas()

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._iterator)

    def _deltas(self) -> Generator[str, None, None]:
        try:
            for sse in iter_sse(self.response.iter_lines()):
                text = self._state.apply(sse)
                if text is not None:
                    yield text
        except httpx.TransportError as exc:
            raise make_connection_error(exc) from exc
        finally:
            self.response.close()
        self._state.check_finished()

    def until_done(self) -> Generation:
        """Consume the rest of the stream and return the result."""
        for _ in self:
            pass
        return self.result

    def close(self) -> None:
        self._iterator.close()
        self.response.close()

    def __enter__(self) -> GenerationStream:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncGenerationStream(_StreamBase):
    """The async twin of `GenerationStream`: `async for delta in stream`, then `.result`."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(response)
        self._iterator = self._deltas()

    def __aiter__(self) -> AsyncIterator[str]:
        return self

    async def __anext__(self) -> str:
        return await self._iterator.__anext__()

    async def _deltas(self) -> AsyncGenerator[str, None]:
        try:
            async for sse in aiter_sse(self.response.aiter_lines()):
                text = self._state.apply(sse)
                if text is not None:
                    yield text
        except httpx.TransportError as exc:
            raise make_connection_error(exc) from exc
        finally:
            await self.response.aclose()
        self._state.check_finished()

    async def until_done(self) -> Generation:
        """Consume the rest of the stream and return the result."""
        async for _ in self:
            pass
        return self.result

    async def close(self) -> None:
        await self._iterator.aclose()
        await self.response.aclose()

    async def __aenter__(self) -> AsyncGenerationStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def _json_or_text(data: str) -> object:
    try:
        return json.loads(data)
    except ValueError:
        return data
