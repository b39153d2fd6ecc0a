"""The README's quick start runs as written (bash, the installed commands, a real server), stops
what it starts, and never collides with examples/train-style (own directory, port and tenant)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TRAIN_STYLE = ROOT / "examples" / "train-style" / "README.md"


def block(path: Path, heading: str, language: str = "bash") -> str:
    """The first fenced `language` block after `heading`."""
    text = path.read_text()
    start = text.index(heading)
    match = re.search(rf"```{language}\n(.*?)```", text[start:], re.S)
    assert match, f"no {language} block after {heading!r} in {path.name}"
    return match.group(1)


def example_facts(script: str) -> tuple[str, str, str]:
    """(port, tenant, directory template) an example script uses."""
    port = re.search(r"--port (\d+)", script)
    tenant = re.search(r"tenant create (\S+)", script)
    directory = re.search(r"mktemp -d (\S+?)\)", script)
    assert port and tenant and directory, script
    return port.group(1), tenant.group(1), directory.group(1)


QUICKSTART = block(README, "## From zero to a streamed completion")
TRAINING = block(TRAIN_STYLE, "Run from the repository root")


def test_examples_never_collide() -> None:
    quick, train = example_facts(QUICKSTART), example_facts(TRAINING)
    for a, b in zip(quick, train, strict=True):
        assert a != b
    assert "kill $SERVER" in TRAINING
    assert "kill $SERVER" in README.read_text()  # the quick start's server is stopped too
    for script in (QUICKSTART, TRAINING):
        assert "kill -0 $SERVER || break" in script  # a server that failed to start ends the wait


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_quickstart_then_sdk_runs_as_written(tmp_path: Path) -> None:
    port = str(free_port())
    quick = QUICKSTART.replace("8100", port)
    quick = re.sub(r"\$\(mktemp -d \S+?\)", str(tmp_path / "demo"), quick)
    sdk = block(README, "## The Python SDK", "python")
    script = "\n".join([
        "set -e -o pipefail",
        "trap 'kill $SERVER 2>/dev/null || true' EXIT",
        quick,
        "export PREFIX_SERVE_BASE_URL=$URL PREFIX_SERVE_API_KEY=$KEY",
        f"python - <<'SDK'\n{sdk}SDK",
        "kill $SERVER; wait $SERVER || true",
        "echo QUICKSTART-DONE",
    ])
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFIX_SERVE_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    result = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=280)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "QUICKSTART-DONE" in result.stdout, output[-4000:]
    assert '"name":"demo"' in result.stdout.replace(" ", "")  # the upload's PrefixInfo
    assert "event: done" in result.stdout  # the streamed generation ended properly
    assert "uploaded sdk-demo version 1" in result.stdout
    assert "Traceback" not in output


@pytest.mark.parametrize("path", [README, TRAIN_STYLE])
def test_no_example_uses_the_old_shared_directory(path: Path) -> None:
    assert "/tmp/prefix-demo" not in path.read_text()


def test_torch_requirement_matches_pyproject() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    required = re.search(r'"torch>=([0-9.]+)"', pyproject)
    assert required, "pyproject.toml names no torch>= requirement"
    assert f"any torch {required.group(1)} or newer" in README.read_text()


def test_install_lines_are_alternatives() -> None:
    """One `pip install` of the project per reader, not one per extra (each rebuilds it)."""
    install = block(README, "## Install")
    projects = [line for line in install.splitlines()
                if re.match(r'pip install "?\.', line.strip())]
    assert len(projects) == 2 and '".[train,ray]"' in projects[1], projects
