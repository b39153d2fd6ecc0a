"""`python -m server` end to end: flags, startup logs, and SIGTERM letting a running stream
finish before the process exits; plus the engine cancelling what outlives the grace period."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from server.models.loader import LoadedModel
from tests.api.conftest import SettingsFactory, serve
from tests.api.helpers import auth, create_tenant, parse_sse

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, process: subprocess.Popen[str], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, "server exited during startup"
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("server did not become healthy")


def test_sigterm_lets_a_running_stream_finish(tiny_model_dir: Callable[..., Path],
                                              tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFIX_SERVE_")}
    env["PREFIX_SERVE_SHUTDOWN_GRACE_S"] = "20"
    process = subprocess.Popen(
        [sys.executable, "-m", "server", "--model", str(tiny_model_dir("llama")),
         "--auth-disabled", "--port", str(port), "--data-dir", str(tmp_path / "data"),
         "--kv-cache-mb", "1", "--max-batch-size", "2", "--dtype", "float32", "--threads", "1"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process)
        body: list[str] = []
        first_delta = threading.Event()

        def stream() -> None:
            with httpx.stream("POST", f"{url}/generate", timeout=60, json={
                    "prompt": "hello world", "max_new_tokens": 240, "stream": True}) as r:
                for line in r.iter_lines():
                    body.append(line)
                    if line.startswith("event: delta"):
                        first_delta.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert first_delta.wait(60)
        process.send_signal(signal.SIGTERM)
        reader.join(60)
        # uvicorn re-raises the signal once it has shut down gracefully
        assert process.wait(60) in (0, -signal.SIGTERM)
    finally:
        if process.poll() is None:
            process.kill()
    logs = process.stdout.read() if process.stdout else ""
    events = parse_sse("\n".join(body) + "\n\n")
    assert events[-1][0] == "done", logs
    assert events[-1][1]["finish_reason"] == "length"
    assert events[-1][1]["usage"]["completion_tokens"] == 240
    for needle in ("AUTHENTICATION IS DISABLED", "family=llama", "fingerprint=", "torch threads=1",
                   "registry: local directory", "shutting down"):
        assert needle in logs, needle


def test_ctrl_c_drains_then_exits_quietly(tiny_model_dir: Callable[..., Path],
                                         tmp_path: Path) -> None:
    """SIGINT (Ctrl-C on a foreground server): the running stream finishes, then the process
    exits with 130 and no KeyboardInterrupt traceback."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFIX_SERVE_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "server", "--model", str(tiny_model_dir("llama")),
         "--auth-disabled", "--port", str(port), "--data-dir", str(tmp_path / "data"),
         "--kv-cache-mb", "1", "--dtype", "float32", "--threads", "1",
         "--shutdown-grace-s", "20"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process)
        with httpx.stream("POST", f"{url}/generate", timeout=60, json={
                "prompt": "hello world", "max_new_tokens": 64, "stream": True}) as response:
            lines = response.iter_lines()
            while not next(lines).startswith("event: delta"):
                pass
            process.send_signal(signal.SIGINT)
            rest = list(lines)
        code = process.wait(60)
    finally:
        if process.poll() is None:
            process.kill()
    logs = process.stdout.read() if process.stdout else ""
    assert "event: done" in rest, logs  # drained first
    assert code == 130, logs
    assert "Traceback" not in logs and "KeyboardInterrupt" not in logs, logs


async def test_requests_outliving_the_grace_period_are_cancelled(
    make_settings: SettingsFactory, loaded: LoadedModel
) -> None:
    async with serve(make_settings(shutdown_grace_s=0), loaded) as served:
        key = await create_tenant(served.client, "acme")
        engine = served.services.engine
        running = asyncio.create_task(served.client.post("/generate", headers=auth(key), json={
            "prompt": "hello world", "max_new_tokens": 240, "stream": True}))
        while engine.stats().running == 0:
            await asyncio.sleep(0.002)
        await served.services.lifecycle.wait_drained()
        events = parse_sse((await running).text)
    assert events[-1][0] == "done"
    assert events[-1][1]["finish_reason"] == "cancelled"
    assert events[-1][1]["usage"]["completion_tokens"] < 240


_NO_RAY_SCRIPT = """
import asyncio, sys
import httpx
import server.__main__
from server.app import create_app
from server.settings import Settings

async def main(model, data_dir):
    app = create_app(Settings(model=model, auth_disabled=True, data_dir=data_dir,
                              kv_cache_mb=1, dtype="float32"))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            r = await client.post("/generate", json={"prompt": "hi", "max_new_tokens": 2})
            assert r.status_code == 200, r.text
            assert "x-prefix-serve-replica" not in r.headers

asyncio.run(main(sys.argv[1], sys.argv[2]))
loaded = sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))
print("ray modules:", loaded)
sys.exit(1 if loaded else 0)
"""


def test_a_plain_server_never_imports_ray(tiny_model_dir: Callable[..., Path],
                                          tmp_path: Path) -> None:
    """Without --replicas: one process, and Ray is never imported (only server/serve_ray does)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFIX_SERVE_")}
    result = subprocess.run(
        [sys.executable, "-c", _NO_RAY_SCRIPT, str(tiny_model_dir("llama")), str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ray modules: []" in result.stdout
    offenders = [
        str(path.relative_to(REPO)) for path in (REPO / "server").rglob("*.py")
        if "serve_ray" not in path.parts
        and any(line.startswith(("import ray", "from ray"))
                for line in path.read_text().splitlines())
    ]
    assert offenders == []
