"""The SSE line decoder against the WHATWG event-stream rules, over httpx line splitting."""

from __future__ import annotations

import httpx

from clients._streaming import ServerSentEvent, SSEDecoder, iter_sse


def decode(text: str) -> list[ServerSentEvent]:
    """Events of a raw byte stream, split into lines by httpx exactly as a response would be."""
    response = httpx.Response(200, content=text.encode())
    return list(iter_sse(response.iter_lines()))


def test_named_events_and_default_type() -> None:
    events = decode('event: delta\ndata: {"text": "hi"}\n\ndata: plain\n\n')
    assert events == [
        ServerSentEvent(event="delta", data='{"text": "hi"}'),
        ServerSentEvent(event="message", data="plain"),
    ]
    assert events[0].json() == {"text": "hi"}


def test_crlf_and_cr_line_endings() -> None:
    # sse-starlette writes \r\n; the spec also allows a bare \r.
    events = decode("event: a\r\ndata: 1\r\n\r\nevent: b\rdata: 2\r\r")
    assert [(e.event, e.data) for e in events] == [("a", "1"), ("b", "2")]


def test_multiline_data_comments_and_one_space_stripped() -> None:
    events = decode(": keep-alive ping\ndata:  two spaces\ndata:no space\ndata\n\n")
    assert events == [ServerSentEvent(event="message", data=" two spaces\nno space\n")]


def test_event_without_data_is_not_dispatched_and_type_resets() -> None:
    events = decode("event: ignored\n\ndata: x\n\n")
    assert events == [ServerSentEvent(event="message", data="x")]


def test_id_is_kept_and_unknown_fields_ignored() -> None:
    events = decode("id: 7\nretry: 100\nfoo: bar\ndata: x\n\ndata: y\n\n")
    assert [(e.id, e.data) for e in events] == [("7", "x"), ("7", "y")]


def test_event_cut_off_by_end_of_stream_is_discarded() -> None:
    assert decode("data: complete\n\ndata: cut off") == [ServerSentEvent("message", "complete")]


def test_utf8_split_across_chunks() -> None:
    payload = 'event: delta\ndata: {"text": "caf\u00e9 \u65e5\u672c"}\n\n'.encode()
    chunks = [payload[i : i + 3] for i in range(0, len(payload), 3)]  # splits multi-byte chars
    response = httpx.Response(200, content=iter(chunks))
    (event,) = iter_sse(response.iter_lines())
    assert event.json() == {"text": "caf\u00e9 \u65e5\u672c"}


def test_decoder_feed_returns_event_on_blank_line_only() -> None:
    decoder = SSEDecoder()
    assert decoder.feed("event: done") is None
    assert decoder.feed('data: {"a": 1}') is None
    assert decoder.feed("") == ServerSentEvent("done", '{"a": 1}')
