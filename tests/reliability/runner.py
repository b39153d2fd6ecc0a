"""Sending the hostile corpus and a few raw-socket requests to a server process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx

from tests.reliability.hostile import Case

ANSWER_DEADLINE_S = 60.0
UPLOADS_PER_TENANT = 2  # the server's default


@dataclass
class CorpusReport:
    statuses: Counter[int] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)  # "name: status body"
    server_errors: list[str] = field(default_factory=list)
    bad_format: list[str] = field(default_factory=list)  # a 4xx outside the error format


async def run_corpus(client: httpx.AsyncClient, url: str, cases: Sequence[Case],
                     keys: dict[str, str], base_model: str,
                     concurrency: int = 8) -> CorpusReport:
    report = CorpusReport()
    gate = asyncio.Semaphore(concurrency)
    # A tenant may have two uploads in progress (--max-concurrent-uploads-per-tenant): the
    # corpus sends its uploads two at a time, so each case is judged on its content.
    uploads = asyncio.Semaphore(UPLOADS_PER_TENANT)

    async def one(case: Case) -> None:
        async with gate, (uploads if case.files or case.data else contextlib.nullcontext()):
            response = await _send(client, url, case, keys, base_model)
        _score(report, case, response)

    await asyncio.gather(*(one(case) for case in cases))
    return report


async def _send(client: httpx.AsyncClient, url: str, case: Case, keys: dict[str, str],
                base_model: str) -> httpx.Response:
    headers = dict(case.headers)
    authorization = keys.get(case.key, case.key)
    if case.key != "none":
        headers["Authorization"] = authorization
    # bytes: latin-1 values (obs-text) go out as they are, as a hostile client would send them
    kwargs: dict[str, object] = {"headers": {k: v.encode("latin-1") for k, v in headers.items()}}
    if case.files or case.data:
        kwargs["data"] = case.data
        kwargs["files"] = [("file", (name, data, "application/octet-stream"))
                           for name, data in case.files] or None
    elif case.content is not None:
        kwargs["headers"]["Content-Type"] = case.content_type.encode()  # type: ignore[index]
        kwargs["content"] = case.content.replace(b'"BASE"', json.dumps(base_model).encode())
    elif case.json_body is not None:
        body = json.loads(json.dumps(case.json_body).replace('"BASE"', json.dumps(base_model)))
        kwargs["json"] = body
    return await client.request(case.method, f"{url}{case.path}", **kwargs)  # type: ignore[arg-type]


def _score(report: CorpusReport, case: Case, response: httpx.Response) -> None:
    status = response.status_code
    report.statuses[status] += 1
    summary = f"{case.name}: {status} {response.text[:200]}"
    if status >= 500:
        report.server_errors.append(summary)
    if case.expect != "any" and str(status)[0] != case.expect[0]:
        report.unexpected.append(summary)
    if 400 <= status < 500 and not _error_format(response):
        report.bad_format.append(summary)


def _error_format(response: httpx.Response) -> bool:
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and set(body) == {"error"} and \
        set(body["error"]) == {"type", "message"}


def slow_body_status(url: str, key: str) -> int:
    """Send headers and a third of a declared body, then nothing: the status that comes back."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=ANSWER_DEADLINE_S) as sock:
        head = (f"POST /generate HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
                "Content-Type: application/json\r\nContent-Length: 300\r\n\r\n")
        sock.sendall(head.encode() + b'{"prompt": "hel')
        answer = b""
        while b"\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    return int(answer.split()[1]) if answer else 0
