"""The HTTP benchmarks' server and client: a real `prefix-serve` process, its tenant and
prefixes (uploaded through the admin API with the SDK), and the load generator's process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch

from bench.common import Workload
from clients import PrefixClient

REPO = Path(__file__).resolve().parents[1]
ADMIN_KEY = "bench-operator-key"
TENANT = "bench"
STARTUP_S = 300


@dataclass(frozen=True)
class Server:
    url: str
    log: Path


@contextmanager
def prefix_serve(model_dir: Path, flags: list[str], workdir: Path,
                 threads: int | None = None) -> Iterator[Server]:
    """`python -m server --model model_dir` with `flags` (plus its key, port and data dir),
    ready to serve; stopped with SIGTERM on exit. `threads` sets its OMP_NUM_THREADS."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFIX_SERVE_")}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    log = workdir / "server.log"
    command = [sys.executable, "-m", "server", "--model", str(model_dir), "--admin-key",
               ADMIN_KEY, "--port", str(port), "--data-dir", str(workdir / "data"), *flags]
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out,
                                   stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, process, log)
        yield Server(url, log)
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"prefix-serve exited during startup:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"prefix-serve was not ready within {STARTUP_S} s")


def add_tenant_and_prefixes(url: str, prefixes: list[dict[str, torch.Tensor]],
                            tenant: str = TENANT) -> str:
    """Create `tenant`, upload `prefixes` as its p0, p1, ...; the tenant's key."""
    with PrefixClient(url, ADMIN_KEY) as admin:
        key = admin.create_tenant(tenant).api_key
    with PrefixClient(url, key, timeout=60) as tenant:
        for i, tensors in enumerate(prefixes):
            tenant.upload_prefix(f"p{i}", tensors)
    return key


def client_spec(url: str, key: str, workload: Workload, metrics_every_s: float | None = None
                ) -> dict[str, Any]:
    """What the client process sends: every row as one streamed greedy completion."""
    requests = [{"model": f"p{r.prefix}", "prompt": r.prompt, "max_tokens": workload.new_tokens}
                for r in workload.rows]
    return {"url": url, "key": key, "requests": requests, "metrics_every_s": metrics_every_s,
            "admin_key": ADMIN_KEY}  # /metrics needs the operator key


def run_client(spec: dict[str, Any], timeout_s: float = 3600,
               module: str = "bench.http_client") -> dict[str, Any]:
    """Run the load generator `module` in its own process on `spec`; its results."""
    done = subprocess.run([sys.executable, "-m", module], input=json.dumps(spec),
                          cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"the client failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    failed = [r for r in result["requests"] if r.get("error")]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed, e.g. {failed[0]['error']}")
    return result
