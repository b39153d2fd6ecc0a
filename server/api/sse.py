"""Server-Sent Events as OpenAI's API and vLLM send them: `data: ...\\n\\n`, LF only.

sse-starlette's defaults (CRLF line ends, a `: ping` comment every 15 s whatever the stream is
doing) are legal SSE, but clients written against OpenAI's wire split events on "\\n\\n" (vLLM's
benchmark client does) and cannot read CRLF streams. Every streaming route builds its response
here, so all of them end lines with "\\n".

Keep-alive: none by default, as OpenAI and vLLM. A stream that is producing tokens needs none,
and comments break a client we must serve: vLLM's benchmark client strips each network read
before buffering it, so a comment that arrives alone (as an idle-time comment always does)
loses its "\\n\\n" and swallows the event after it (seen with a faithful copy of its parser).
But a request can wait in the queue, or behind a long prefill, with nothing to send, and
proxies cut idle connections (nginx's `proxy_read_timeout` and AWS ALB's idle timeout are 60 s
by default). An operator behind such a proxy sets `--sse-keepalive-s`: a stream that has sent
nothing for that long gets one `: keep-alive` comment; a busy stream still gets none. Parsers
that follow the SSE spec skip comments (the openai SDK and this project's SDK do).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping

from sse_starlette import EventSourceResponse, ServerSentEvent

from server.settings import Settings

log = logging.getLogger("prefix_serve.api")
SEP = "\n"
SEND_TIMEOUT_S = 30  # a client that reads nothing for this long is dropped
_pumps: set[asyncio.Task[None]] = set()  # strong references to the running stream readers


def sse_event(data: str, event: str | None = None) -> ServerSentEvent:
    """One event, LF line ends: `[event: NAME\\n]data: DATA\\n\\n`."""
    return ServerSentEvent(data, event=event, sep=SEP)


def keep_alive_event() -> ServerSentEvent:
    return ServerSentEvent(comment="keep-alive", sep=SEP)


def sse_response(events: AsyncIterator[ServerSentEvent], headers: Mapping[str, str],
                 settings: Settings) -> EventSourceResponse:
    """A streaming response of `events`: LF only, keep-alive comments only while idle."""
    return EventSourceResponse(
        keep_alive(events, settings.sse_keepalive_s), ping=0, sep=SEP,
        send_timeout=SEND_TIMEOUT_S, headers=headers,
        shutdown_grace_period=settings.shutdown_grace_s + 1,
    )


async def keep_alive(events: AsyncIterator[ServerSentEvent], idle_s: float
                     ) -> AsyncIterator[ServerSentEvent]:
    """`events`, plus a keep-alive comment each time `idle_s` passes without one (0: never).

    The events are read by a task of their own, so waiting for the next one can time out without
    cancelling it; when this stream ends early (the client hung up) that task is cancelled, which
    runs the events' own cleanup (the routes cancel their engine request there)."""
    if idle_s <= 0:
        async for event in events:
            yield event
        return
    queue: asyncio.Queue[ServerSentEvent | None] = asyncio.Queue(maxsize=1)
    pump = asyncio.ensure_future(_pump(events, queue))
    _pumps.add(pump)
    pump.add_done_callback(_pumps.discard)
    try:
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), idle_s)
            except TimeoutError:
                yield keep_alive_event()
                continue
            if item is None:
                return
            yield item
    finally:
        pump.cancel()


async def _pump(events: AsyncIterator[ServerSentEvent],
                queue: asyncio.Queue[ServerSentEvent | None]) -> None:
    try:
        async for event in events:
            await queue.put(event)
    except Exception:  # the routes' streams catch their own failures; this is a last resort
        log.exception("an event stream failed")
    await queue.put(None)
