"""A real `prefix-serve` process (`python -m server`) on a free loopback port, to burst, signal
and kill; its output goes to a log file that failures quote."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.redis_procs import free_port

REPO = Path(__file__).resolve().parents[2]
ADMIN_KEY = "reliability-operator-key"
START_TIMEOUT_S = 180.0
# Small and fixed, so the suite behaves the same on any machine: one torch thread, a small KV
# pool, a queue that holds a whole burst.
BASE_FLAGS = ["--threads", "1", "--kv-cache-mb", "64", "--max-queue", "1024",
              "--shutdown-grace-s", "3", "--log-level", "warning"]


class ServerProcess:
    def __init__(self, model_dir: Path, workdir: Path, flags: list[str]) -> None:
        self.model_dir, self.workdir, self.flags = model_dir, workdir, flags
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"server-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    def start(self) -> float:
        """Start and wait until `/ready`; returns the seconds it took."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFIX_SERVE_")}
        env |= {"PREFIX_SERVE_ADMIN_KEY": ADMIN_KEY, "OMP_NUM_THREADS": "1"}
        command = [sys.executable, "-m", "server", "--model", str(self.model_dir),
                   "--port", str(self.port), *BASE_FLAGS, *self.flags]
        started = time.monotonic()
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out,
                                            stderr=subprocess.STDOUT)
        while not self._ready():
            if self.process.poll() is not None or time.monotonic() - started > START_TIMEOUT_S:
                raise RuntimeError(f"prefix-serve did not become ready:\n{self.tail()}")
            time.sleep(0.1)
        return time.monotonic() - started

    def _ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def wait(self, timeout_s: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout_s)

    def kill(self) -> None:
        """kill -9: no drain, no cleanup."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


@contextmanager
def prefix_serve(model_dir: Path, workdir: Path, flags: list[str]) -> Iterator[ServerProcess]:
    server = ServerProcess(model_dir, workdir, flags)
    server.start()
    try:
        yield server
    finally:
        server.stop()
