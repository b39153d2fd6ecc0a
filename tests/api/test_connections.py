"""Connection limits, against a real `prefix-serve` process over raw sockets (docs/security.md,
"Connections: slow and oversized clients"): a header read timeout, a header size cap answered
with 431, a connection cap that closes the longest-idle connection for a newcomer (so `/health`
still answers), and concurrent uploads over their limits answered with 429."""

from __future__ import annotations

import json
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any, cast

import httpx
import pytest

from server.connections import ConnectionLimits, ConnectionTable, LimitedHttpProtocol
from server.settings import Settings
from server.startup import FD_RESERVE
from tests.reliability.procs import ADMIN_KEY, REPO, ServerProcess, prefix_serve

HEADER_TIMEOUT_S = 1.5
MAX_HEADER_KB = 16
MAX_CONNECTIONS = 48
FLAGS = ["--header-timeout-s", str(HEADER_TIMEOUT_S), "--max-header-kb", str(MAX_HEADER_KB),
         "--max-connections", str(MAX_CONNECTIONS), "--max-concurrent-uploads", "2",
         "--max-concurrent-uploads-per-tenant", "1"]
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="module")
def server(tiny_model_dir: Any, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[ServerProcess]:
    workdir = tmp_path_factory.mktemp("connections")
    flags = [*FLAGS, "--data-dir", str(workdir / "data")]
    with prefix_serve(tiny_model_dir("llama"), workdir, flags) as process:
        yield process


def connect(server: ServerProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def read_reply(sock: socket.socket, timeout_s: float = 20.0) -> bytes:
    """Everything the server sends until it closes (or the timeout)."""
    sock.settimeout(timeout_s)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def status_and_error(reply: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = reply.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)["error"]


def test_trickled_headers_are_answered_408_and_closed_at_the_timeout(
    server: ServerProcess,
) -> None:
    sock = connect(server)
    try:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        sock.settimeout(0.25)
        started, reply = time.monotonic(), b""
        while time.monotonic() - started < 30:  # before the fix: trickles on for all 30 s
            try:
                sock.sendall(b"X-Slow: a\r\n")  # a header line every 0.25 s, never the end
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not chunk:
                break
            reply += chunk
        elapsed = time.monotonic() - started
    finally:
        sock.close()
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert status_and_error(reply)[1]["type"] == "request_timeout"
    assert elapsed < 15, elapsed  # generous: the timeout is 1.5 s


def test_a_silent_connection_is_closed_at_the_timeout(server: ServerProcess) -> None:
    sock = connect(server)
    try:
        assert _closed_by_server(sock, timeout_s=30)  # without a word: no request began
    finally:
        sock.close()


@pytest.mark.parametrize("size", [20 * 1024, 64 * 1024, 8 * 2**20], ids=["20KiB", "64KiB", "8MiB"])
def test_headers_over_the_cap_get_431(server: ServerProcess, size: int) -> None:
    sock = connect(server)
    sent, reply = 0, b""
    try:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
        piece = b"a" * min(size, 65536)  # 20 KiB: complete headers in one read, measured whole
        while sent < size and not reply:  # stream it; stop once the server has answered
            try:
                sock.sendall(piece)
            except OSError:
                break
            sent += len(piece)
            if select.select([sock], [], [], 0)[0]:
                reply = sock.recv(65536)
        if sent >= size:
            sock.sendall(b"\r\n\r\n")
        reply += read_reply(sock)
    finally:
        sock.close()
    status, error = status_and_error(reply)
    assert (status, error["type"]) == (431, "headers_too_large"), reply[:300]
    if size > 2**20:  # answered while the header was still arriving (kernel buffers hold some)
        assert sent < size, sent


def test_a_malformed_request_gets_400_in_the_error_format(server: ServerProcess) -> None:
    sock = connect(server)
    try:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        status, error = status_and_error(read_reply(sock))
    finally:
        sock.close()
    assert (status, error["type"]) == (400, "invalid_request")


def test_headers_under_the_cap_are_served(server: ServerProcess) -> None:
    response = httpx.get(f"{server.url}/health", headers={"X-Fine": "a" * 8000}, timeout=10)
    assert response.status_code == 200


def test_idle_connections_beyond_the_cap_do_not_keep_out_health(server: ServerProcess) -> None:
    socks: list[socket.socket] = []
    try:
        for i in range(300):
            sock = connect(server)
            if i % 2:
                sock.sendall(b"GET /health HTTP/1.1\r\n")  # headers begun, never finished
            socks.append(sock)
        for _ in range(5):  # fresh connections, as a liveness probe makes them
            assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
        closed = sum(1 for sock in socks if _closed_by_server(sock))
    finally:
        for sock in socks:
            sock.close()
    # The cap holds: at most MAX_CONNECTIONS stay open (the probes took room too).
    assert closed >= len(socks) - MAX_CONNECTIONS, closed


def _closed_by_server(sock: socket.socket, timeout_s: float = 2.0) -> bool:
    sock.settimeout(timeout_s)
    try:
        return sock.recv(65536) == b""  # EOF: the server closed it
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_concurrent_uploads_over_their_limits_get_429(server: ServerProcess) -> None:
    keys = {name: _tenant_key(server, name) for name in ("up-a", "up-b", "up-c")}
    held = [_hold_upload(server, keys["up-a"])]
    try:
        first = _upload_until_refused(server, keys["up-a"])  # per tenant: 1
        assert first.status_code == 429, first.text
        assert first.json()["error"]["type"] == "too_many_uploads"
        assert int(first.headers["Retry-After"]) >= 1
        held.append(_hold_upload(server, keys["up-b"]))
        second = _upload_until_refused(server, keys["up-c"])  # in all: 2
        assert second.status_code == 429, second.text
        assert "uploads already" in second.json()["error"]["message"]
    finally:
        for sock in held:
            sock.close()
    # The slots come back when the held uploads end (their clients went away).
    deadline = time.monotonic() + 20
    while (after := _upload(server, keys["up-c"])).status_code == 429:
        assert time.monotonic() < deadline, "upload slots were not given back"
        time.sleep(0.2)
    assert after.status_code in (400, 422), after.text  # the file itself is refused


def _tenant_key(server: ServerProcess, name: str) -> str:
    response = httpx.post(f"{server.url}/admin/tenants", json={"name": name}, headers=ADMIN,
                          timeout=30)
    assert response.status_code == 201, response.text
    return str(response.json()["api_key"])


def _hold_upload(server: ServerProcess, key: str) -> socket.socket:
    """An upload whose body has begun and then stalls: it holds its slot until closed."""
    sock = connect(server)
    head = (f"POST /admin/prefixes HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n")
    sock.sendall(head.encode() + b"--b\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\n")
    return sock


def _upload(server: ServerProcess, key: str) -> httpx.Response:
    return httpx.post(f"{server.url}/admin/prefixes", headers={"Authorization": f"Bearer {key}"},
                      data={"name": "p"}, files={"file": ("p.bin.txt", b"not a prefix")},
                      timeout=30)


def _upload_until_refused(server: ServerProcess, key: str) -> httpx.Response:
    """The held upload reaches the server a moment after its bytes are sent: try a few times."""
    deadline = time.monotonic() + 10
    while (response := _upload(server, key)).status_code != 429:
        if time.monotonic() > deadline:
            return response
        time.sleep(0.2)
    return response


class _Conn:
    """What `ConnectionTable` needs of a connection."""

    def __init__(self, ip: str) -> None:
        self.ip, self.evicted = ip, False

    def evict(self) -> None:
        self.evicted = True


def conn(ip: str = "10.0.0.1") -> LimitedHttpProtocol:
    return cast(LimitedHttpProtocol, _Conn(ip))


def test_the_table_closes_the_longest_idle_connection_and_refuses_when_all_are_busy() -> None:
    table = ConnectionTable(ConnectionLimits(1.0, 1024, max_connections=3,
                                             max_connections_per_ip=None))
    a, b, c, d, e = (conn() for _ in range(5))
    for each in (a, b, c):
        assert table.admit(each)
    table.mark_busy(a)
    assert table.admit(d)  # b was idle the longest: closed for d
    assert cast(_Conn, b).evicted and not cast(_Conn, a).evicted
    table.mark_busy(c)
    table.mark_busy(d)
    assert not table.admit(e)  # every open one has a request in progress: refused
    table.drop(a)
    assert table.admit(e)


def test_the_table_caps_connections_per_address() -> None:
    table = ConnectionTable(ConnectionLimits(1.0, 1024, max_connections=100,
                                             max_connections_per_ip=2))
    first, second, third = (conn("10.0.0.1") for _ in range(3))
    assert table.admit(first) and table.admit(second)
    assert not table.admit(third)
    assert table.admit(conn("10.0.0.2"))  # another address is not affected
    table.drop(first)
    assert table.admit(third)


def test_the_connection_cap_is_fitted_to_the_open_files_limit() -> None:
    """With a hard limit of 1024 open files, 4096 connections cannot be held: the cap is lowered
    (accept would otherwise fail with EMFILE and keep out every new connection)."""
    script = (
        "import resource; resource.setrlimit(resource.RLIMIT_NOFILE, (512, 1024));"
        "from server.settings import Settings; from server.startup import fit_open_files;"
        "s = Settings(model='m', auth_disabled=True, max_connections=4096);"
        "print(fit_open_files(s), resource.getrlimit(resource.RLIMIT_NOFILE)[0])"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, cwd=REPO).stdout.split()
    reserve = FD_RESERVE + Settings(model="m", auth_disabled=True).redis_max_connections
    assert [int(x) for x in out] == [1024 - reserve, 1024]  # soft raised to hard, cap fitted
