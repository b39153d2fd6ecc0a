"""`prefix-serve --replicas 2` in a terminal: Ray's own chatter (colour-coded actor log lines,
the Serve controller's INFO lines, the raylet's `ServeController.graceful_shutdown failed` on a
clean stop) stays out of the server's output; Ctrl-C stops it with status 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.api.test_main import REPO, free_port, wait_healthy

pytest.importorskip("ray")


def test_a_replicated_server_starts_and_stops_quietly(tiny_model_dir: Callable[..., Path],
                                                      tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFIX_SERVE_", "RAY_"))}
    process = subprocess.Popen(
        [sys.executable, "-m", "server", "--model", str(tiny_model_dir("llama")),
         "--auth-disabled", "--port", str(port), "--data-dir", str(tmp_path / "data"),
         "--replicas", "2", "--replica-cpus", "0.5", "--replica-gpus", "0",
         "--kv-cache-mb", "1", "--dtype", "float32", "--device", "cpu",
         "--shutdown-grace-s", "1"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: list[str] = []
    try:
        assert process.stdout is not None
        for line in process.stdout:  # until the server says it is serving (start() returned)
            lines.append(line)
            if " serving " in line:
                break
        wait_healthy(f"http://127.0.0.1:{port}", process, timeout_s=60)
        process.send_signal(signal.SIGINT)
        code = process.wait(120)
    finally:
        if process.poll() is None:
            process.kill()
    output = "".join(lines) + (process.stdout.read() if process.stdout else "")
    assert code == 0, output
    assert "serving" in output and "stopping" in output, output  # our own lines remain
    for noise in ("\x1b[", "graceful_shutdown failed", "(ServeController", "(ProxyActor",
                  "Traceback"):
        assert noise not in output, f"{noise!r} in:\n{output}"
