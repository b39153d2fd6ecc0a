"""Slow and oversized connections vs `/health`, and bombs vs the server's memory: a real
`prefix-serve` process, attacked over raw sockets, its RSS read from /proc.

- Hundreds of connections trickling headers, and clients streaming 32 MiB headers, while a
  liveness-style probe opens a fresh connection for `/health` every 100 ms: every probe is
  answered 200 (its latency is recorded).
- The issue's archive bombs uploaded over HTTP (a 1 GiB PAX comment in 1 MiB of gzip, a 128 MiB GNU
  long name, a zip of 600,000 entries): each refused, the server's peak RSS barely moves.
- 24 uploads begun and left unfinished at once: all but the concurrent-upload slots get 429.
"""

from __future__ import annotations

import contextlib
import json
import selectors
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from tests.registry.test_archive_bombs import gnu_longname_bomb, pax_comment_bomb, zip_with_entries
from tests.reliability.conftest import record
from tests.reliability.procs import ADMIN_KEY, ServerProcess, prefix_serve

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
MiB = 2**20
RECONNECTS_PER_ROUND = 50  # per 0.2 s: the trickling attacker's reconnect rate is bounded


def memory_mb(server: ServerProcess) -> tuple[float, float]:
    """The server process's (VmRSS, VmHWM) in MB: now, and the peak so far."""
    assert server.process is not None
    fields = dict(line.split(":", 1) for line in
                  Path(f"/proc/{server.process.pid}/status").read_text().splitlines())
    return tuple(int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM"))  # type: ignore[return-value]


class Attack:
    """`trickling` connections that send one header byte every 0.2 s (reconnecting, ~250 a
    second at most, when the server closes them) and `oversized` threads streaming 32 MiB
    headers (a new one 0.2 s after each is cut off), until stopped."""

    def __init__(self, server: ServerProcess, trickling: int, oversized: int) -> None:
        self.address = ("127.0.0.1", server.port)
        self.stop = threading.Event()
        self.closed_by_server = 0
        self.oversized_answers: dict[int, int] = {}  # status -> count
        self.threads = [threading.Thread(target=self._trickle, args=(trickling,), daemon=True)]
        self.threads += [threading.Thread(target=self._oversize, daemon=True)
                         for _ in range(oversized)]
        for thread in self.threads:
            thread.start()

    def _trickle(self, count: int) -> None:
        selector = selectors.DefaultSelector()
        for _ in range(count):
            self._open(selector)
        lost = 0
        while not self.stop.is_set():
            for key, _ in selector.select(timeout=0.2):  # readable: an answer or a close
                selector.unregister(key.fileobj)
                key.fileobj.close()  # type: ignore[union-attr]
                self.closed_by_server += 1
                lost += 1
            for _ in range(min(lost, RECONNECTS_PER_ROUND)):  # an attacker's pace: ~250/s
                self._open(selector)
                lost -= 1
            for key in list(selector.get_map().values()):
                with contextlib.suppress(OSError):
                    key.fileobj.send(b"a")  # type: ignore[union-attr]
        for key in list(selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        selector.close()

    def _open(self, selector: selectors.BaseSelector) -> None:
        try:
            sock = socket.create_connection(self.address, timeout=5)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        except OSError:
            return
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)

    def _oversize(self) -> None:
        piece = b"a" * 65536
        while not self.stop.is_set():
            with socket.create_connection(self.address, timeout=10) as sock:
                try:
                    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
                    for _ in range(32 * MiB // len(piece)):
                        sock.sendall(piece)
                    sock.sendall(b"\r\n\r\n")
                    reply = sock.recv(64)
                except OSError:
                    reply = b""
            status = int(reply.split(b" ")[1]) if reply.startswith(b"HTTP/1.1 ") else 0
            self.oversized_answers[status] = self.oversized_answers.get(status, 0) + 1
            time.sleep(0.2)

    def end(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)


PROBE = """
import json, socket, sys, time
port, seconds = int(sys.argv[1]), float(sys.argv[2])
results, deadline = [], time.monotonic() + seconds
while time.monotonic() < deadline:
    started = time.perf_counter()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /health HTTP/1.1\\r\\nHost: p\\r\\nConnection: close\\r\\n\\r\\n")
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        status = int(reply.split(b" ")[1]) if reply.startswith(b"HTTP/1.1 ") else 0
    except OSError:
        status = 0
    results.append([time.perf_counter() - started, status])
    time.sleep(0.1)
print(json.dumps(results))
"""


def probe_health(server: ServerProcess, seconds: float) -> list[tuple[float, int]]:
    """(latency, status) of `/health` on a fresh connection every 100 ms, as kubelet probes; from
    a process of its own, so the attacking threads here do not slow the probe's client."""
    out = subprocess.run([sys.executable, "-c", PROBE, str(server.port), str(seconds)],
                         capture_output=True, text=True, check=True, timeout=seconds + 60)
    return [(latency, status) for latency, status in json.loads(out.stdout)]


def test_slow_and_oversized_connections_vs_health(model_dir: Path, tmp_path: Path) -> None:
    flags = ["--header-timeout-s", "2", "--max-connections", "256", "--data-dir",
             str(tmp_path / "data")]
    with prefix_serve(model_dir, tmp_path, flags) as server:
        rss_before, _ = memory_mb(server)
        attack = Attack(server, trickling=600, oversized=4)
        try:
            time.sleep(1.0)  # let the connections pile up
            probes = probe_health(server, seconds=10)
            rss_during, hwm = memory_mb(server)
        finally:
            attack.end()
    latencies = sorted(latency for latency, _ in probes)
    failures = sum(status != 200 for _, status in probes)
    record("slow and oversized connections vs /health", trickling=600, oversized_clients=4,
           max_connections=256, health_probes=len(probes), health_failures=failures,
           health_p50_s=round(statistics.median(latencies), 3),
           health_p99_s=round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 3),
           trickling_closed_by_server=attack.closed_by_server,
           oversized_answers=dict(sorted(attack.oversized_answers.items())),
           rss_growth_mb=round(rss_during - rss_before, 1), peak_rss_mb=round(hwm, 1))
    assert failures == 0
    assert attack.closed_by_server > 0  # evicted for newcomers, or timed out
    assert set(attack.oversized_answers) <= {0, 431}  # 431, or cut off while still sending
    assert rss_during - rss_before < 200


def test_archive_bombs_and_unfinished_uploads_vs_server_memory(model_dir: Path,
                                                               tmp_path: Path) -> None:
    bombs = {"pax_1GiB.tar.gz": pax_comment_bomb(2**30),
             "longname_128MiB.tar.gz": gnu_longname_bomb(128 * MiB),
             "zip_600k_entries.zip": zip_with_entries(600_000)}
    with prefix_serve(model_dir, tmp_path, ["--data-dir", str(tmp_path / "data")]) as server:
        for filename, data in bombs.items():
            rss_before, hwm_before = memory_mb(server)
            started = time.monotonic()
            response = httpx.post(f"{server.url}/admin/prefixes", headers=ADMIN,
                                  data={"name": "bomb"}, files={"file": (filename, data)},
                                  timeout=120)
            seconds = time.monotonic() - started
            rss_after, hwm_after = memory_mb(server)
            record(f"bomb {filename} vs server memory", upload_kib=len(data) // 1024,
                   status=response.status_code, error=response.json()["error"]["type"],
                   seconds=round(seconds, 2), rss_growth_mb=round(rss_after - rss_before, 1),
                   peak_rss_growth_mb=round(hwm_after - hwm_before, 1))
            assert response.status_code in (413, 422), response.text
            assert hwm_after - hwm_before < 150  # the 28 MiB zip is held twice while parsed
        statuses, growth = unfinished_uploads(server, count=24, body_mib=8)
    record("24 unfinished uploads vs server memory", refused_429=statuses.count(429),
           held=statuses.count(0), rss_growth_mb=round(growth, 1))
    assert statuses.count(429) == 24 - 2  # the operator key is one tenant: 2 slots


def unfinished_uploads(server: ServerProcess, count: int, body_mib: int) -> tuple[list[int], float]:
    """`count` uploads announcing 60 MiB, each sending `body_mib` of it and stopping there; the
    status each got (0: none yet, it holds a slot) and the RSS growth while they hang."""
    rss_before, _ = memory_mb(server)
    socks, statuses = [], []
    head = (f"POST /admin/prefixes HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_KEY}\r\n"
            f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {60 * MiB}\r\n\r\n"
            '--b\r\nContent-Disposition: form-data; name="file"; filename="x"\r\n\r\n').encode()
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=1)
            socks.append(sock)  # a refused one stops being read: its send times out at once
            try:
                sock.sendall(head)
                for _ in range(body_mib):
                    sock.sendall(b"\0" * MiB)
            except OSError:
                pass
        time.sleep(2.0)
        growth = memory_mb(server)[0] - rss_before
        for sock in socks:
            sock.settimeout(0.5)
            try:
                reply = sock.recv(64)
            except (TimeoutError, OSError):
                reply = b""
            statuses.append(int(reply.split(b" ")[1]) if reply.startswith(b"HTTP/1.1 ") else 0)
    finally:
        for sock in socks:
            sock.close()
    return statuses, growth
