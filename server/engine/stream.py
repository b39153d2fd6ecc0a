"""A request's event stream on the caller's asyncio loop, and the hand-off from the engine thread.

The engine thread never touches asyncio objects directly: it collects `(stream, event)` pairs
during a step and hands each loop its batch with one `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Callable

from server.engine.request import Completion, Event, Finished, TextDelta


class RequestStream:
    """Async iterator of `TextDelta`s ending with exactly one `Finished`."""

    def __init__(
        self, request_id: str, loop: asyncio.AbstractEventLoop, cancel: Callable[[str], None]
    ) -> None:
        self.request_id = request_id
        self.loop = loop
        self._cancel = cancel
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Event:
        if self._done:
            raise StopAsyncIteration
        event = await self._queue.get()
        if isinstance(event, Finished):
            self._done = True
        return event

    async def collect(self) -> Completion:
        """Wait for the end; the concatenated text and token ids plus the final event."""
        parts: list[str] = []
        token_ids: list[int] = []
        async for event in self:
            if isinstance(event, TextDelta):
                parts.append(event.text)
                token_ids.extend(event.token_ids)
            else:
                return Completion(self.request_id, "".join(parts), token_ids, event)
        raise RuntimeError("stream already consumed")

    def cancel(self) -> None:
        """The caller went away: the request leaves the batch at the next step."""
        self._cancel(self.request_id)

    def _put(self, event: Event) -> None:
        self._queue.put_nowait(event)


class Outbox:
    """Events produced on the engine thread, delivered once per step to each caller's loop."""

    def __init__(self) -> None:
        self._items: list[tuple[RequestStream, Event]] = []

    def put(self, stream: RequestStream, event: Event) -> None:
        self._items.append((stream, event))

    def flush(self) -> None:
        items, self._items = self._items, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, Event]]] = (
            defaultdict(list)
        )
        for stream, event in items:
            by_loop[stream.loop].append((stream, event))
        for loop, batch in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
                loop.call_soon_threadsafe(_deliver, batch)


def _deliver(batch: list[tuple[RequestStream, Event]]) -> None:
    for stream, event in batch:
        stream._put(event)
