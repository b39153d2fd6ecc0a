"""One private `redis-server` process on a free loopback port, to kill and restart in fault tests.

With `aof=True` it persists every write (`appendfsync always`), so a restart on the same port and
directory must find every acknowledged write; without, a restart starts empty.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from tests.redis_procs import free_port


def redis_missing() -> str | None:
    return None if shutil.which("redis-server") else "redis-server is not installed"


class RedisServer:
    def __init__(self, directory: Path, *, aof: bool, port: int | None = None) -> None:
        self.directory = directory
        self.aof = aof
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 30.0) -> None:
        persistence = (["--appendonly", "yes", "--appendfsync", "always"] if self.aof
                       else ["--appendonly", "no"])
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--protected-mode", "no", "--dir", str(self.directory), *persistence]
        log = open(self.directory / "redis.log", "ab")  # noqa: SIM115 (the child holds it)
        self.process = subprocess.Popen(args, stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + timeout_s
        while not self.pings():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.05)

    def pings(self) -> bool:
        try:
            client = redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1)
            try:
                return bool(client.ping())
            finally:
                client.close()
        except redis.RedisError:
            return False

    def kill(self) -> None:
        """kill -9: no shutdown, no last write to disk."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@contextmanager
def redis_server(directory: Path, *, aof: bool) -> Iterator[RedisServer]:
    server = RedisServer(directory, aof=aof)
    server.start()
    try:
        yield server
    finally:
        server.stop()
