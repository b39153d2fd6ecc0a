"""Bounded work before a request is trusted, over a real uvicorn socket: the key is checked before
a byte of the body is read, JSON bodies are limited as they stream in, and a body that never
finishes is cut off. Each test sends raw HTTP and waits (with a generous deadline) for the answer
while the body is still incomplete: a server that reads the whole body first never answers."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import httpx
import pytest

from server.models.loader import LoadedModel
from tests.api.conftest import SettingsFactory
from tests.api.helpers import ADMIN_KEY, auth, prefix_tensors, safetensors_file
from tests.api.live import LiveServer, live_server

ANSWER_DEADLINE_S = 30.0


@pytest.fixture
def live(make_settings: SettingsFactory, loaded: LoadedModel) -> Iterator[LiveServer]:
    settings = make_settings(max_body_mb=0.25, body_timeout_s=1.0, max_upload_mb=0.5)
    with live_server(settings, loaded) as server:
        yield server


def _send_head(live: LiveServer, path: str, headers: dict[str, str], body: bytes) -> socket.socket:
    host, port = live.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=ANSWER_DEADLINE_S)
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", *(f"{k}: {v}" for k, v in headers.items())]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    return sock


def _answer(sock: socket.socket) -> tuple[int, dict]:
    """The status and JSON body of the response (read until the connection closes or the
    body is complete)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed without an answer: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    while len(rest) < length:
        rest += sock.recv(65536)
    return int(head.split()[1]), json.loads(rest[:length])


def test_an_unauthenticated_body_is_never_read(live: LiveServer) -> None:
    headers = {"Content-Type": "application/json", "Content-Length": str(300 * 2**20)}
    with _send_head(live, "/generate", headers, b'{"prompt": "' + b"x" * 65536) as sock:
        status, body = _answer(sock)
    assert status == 401 and body["error"]["type"] == "authentication_error"


def test_a_declared_json_body_over_the_limit_is_refused_before_reading(live: LiveServer) -> None:
    headers = {**auth(ADMIN_KEY), "Content-Type": "application/json",
               "Content-Length": str(2**20)}
    with _send_head(live, "/generate", headers, b'{"prompt": "') as sock:
        status, body = _answer(sock)
    assert status == 413 and body["error"]["type"] == "payload_too_large"


def test_a_chunked_json_body_is_cut_off_at_the_limit(live: LiveServer) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(64):  # 4 MiB, past the 0.25 MiB limit
            yield b"x" * 65536
        yield b'"}'

    response = httpx.post(f"{live.url}/generate", headers=auth(ADMIN_KEY), content=chunks(),
                          timeout=ANSWER_DEADLINE_S)
    assert response.status_code == 413, response.text
    assert response.json()["error"]["type"] == "payload_too_large"


def test_a_body_that_never_finishes_is_cut_off(live: LiveServer) -> None:
    headers = {**auth(ADMIN_KEY), "Content-Type": "application/json", "Content-Length": "1000"}
    with _send_head(live, "/generate", headers, b'{"prompt": "hel') as sock:
        status, body = _answer(sock)
    assert status == 408 and body["error"]["type"] == "request_timeout"
    ready = httpx.get(f"{live.url}/ready", timeout=ANSWER_DEADLINE_S)
    assert ready.status_code == 200


def test_uploads_keep_their_own_larger_limit(live: LiveServer, loaded: LoadedModel) -> None:
    data = safetensors_file(prefix_tensors(loaded, prefix_len=4)) + b"\0" * (300 * 1024)
    response = httpx.post(f"{live.url}/admin/prefixes", headers=auth(ADMIN_KEY),
                          data={"name": "p"}, files={"file": ("p.safetensors", data)},
                          timeout=ANSWER_DEADLINE_S)
    assert response.status_code != 413, response.text  # 0.3 MiB: over the JSON limit only
