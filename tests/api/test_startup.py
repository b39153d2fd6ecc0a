"""`prefix-serve` before the model loads: help, and one-line errors (exit 2) naming the setting.

Each case runs the real command in a subprocess. "Before the model loads" is checked by the
absence of the `loading ...` log line that precedes the model load.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from server.cli_args import build_parser, describe_error, env_var, flag
from server.settings import Settings
from server.startup import StartupError, bind_socket

REPO = Path(__file__).resolve().parents[2]


def run_server(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PREFIX_SERVE_")}
    return subprocess.run(
        [sys.executable, "-m", "server", *args], cwd=REPO, env=clean | (env or {}),
        capture_output=True, text=True, timeout=180,
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("prefix-serve: error: ")]
    assert len(errors) == 1, result.stderr
    assert "loading" not in result.stderr  # the model load never started
    assert "Traceback" not in result.stderr and "pydantic" not in result.stderr
    return errors[0]


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A port where nothing listens (bound, not listening: connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_help_is_readable_and_imports_no_torch() -> None:
    code = (
        "import sys\nfrom server.__main__ import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=120, env=os.environ | {"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    text = result.stdout
    for needle in ("--model ID_OR_DIR", "(required; $PREFIX_SERVE_MODEL)", "--threads N",
                   "--admin-key KEY", "(default: the model directory's name, or the hub id;",
                   "(default: 16;"):
        assert needle in text, needle
    for wrong in ("null", "SecretStr", "{str", "(default: model's)"):
        assert wrong not in text, wrong


def test_every_setting_has_a_flag_with_help(monkeypatch: pytest.MonkeyPatch) -> None:
    """Read from `--help` itself (at a wide terminal, so no help wraps): every setting has a
    flag, every flag a setting, and each one's help names its environment variable."""
    monkeypatch.setenv("COLUMNS", "10000")
    entries: list[str] = []  # each flag's lines: its name, then its help (maybe on the next)
    for line in build_parser().format_help().splitlines():
        if line.startswith("  -"):
            entries.append(line.strip())
        elif entries and line.startswith("   "):
            entries[-1] += " " + line.strip()
    flags = {entry.split()[0].rstrip(","): entry for entry in entries}
    flags.pop("-h", None)
    flags.pop("--version", None)
    assert set(flags) == {flag(name) for name in Settings.model_fields}
    for name in Settings.model_fields:
        assert f"${env_var(name)}" in flags[flag(name)], flags[flag(name)]


def test_missing_model_names_the_flag_and_variable() -> None:
    line = one_error_line(run_server("--admin-key", "k"))
    assert "--model ($PREFIX_SERVE_MODEL) is required" in line


def test_missing_operator_key_is_one_line() -> None:
    line = one_error_line(run_server("--model", "m"))
    assert "--admin-key" in line and "PREFIX_SERVE_ADMIN_KEY" in line


def test_bad_value_from_the_environment_names_both() -> None:
    line = one_error_line(run_server("--model", "m", "--auth-disabled",
                                     env={"PREFIX_SERVE_PORT": "99999"}))
    assert "--port ($PREFIX_SERVE_PORT)" in line and "99999" in line


def test_port_in_use_fails_before_the_model_loads(
    busy_port: int, tiny_model_dir: Callable[..., Path], tmp_path: Path
) -> None:
    line = one_error_line(run_server(
        "--model", str(tiny_model_dir("llama")), "--auth-disabled", "--port", str(busy_port),
        "--data-dir", str(tmp_path)))
    assert f"--port ($PREFIX_SERVE_PORT): 127.0.0.1:{busy_port} is already in use" in line


def test_unreachable_redis_fails_before_the_model_loads(
    dead_port: int, busy_port: int, tiny_model_dir: Callable[..., Path]
) -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    line = one_error_line(run_server(
        "--model", str(tiny_model_dir("llama")), "--auth-disabled", "--port", str(port),
        "--redis-url", f"redis://127.0.0.1:{dead_port}/0"))
    assert "--redis-url ($PREFIX_SERVE_REDIS_URL)" in line and str(dead_port) in line


@pytest.mark.parametrize("url", ["localhost:6379", "http://127.0.0.1:6379/0"])
def test_malformed_redis_url_is_named(url: str) -> None:
    line = one_error_line(run_server("--model", "m", "--auth-disabled", "--port", "0",
                                     "--redis-url", url))
    assert "--redis-url ($PREFIX_SERVE_REDIS_URL)" in line
    for scheme in ("redis://", "rediss://", "unix://", "redis+sentinel://", "redis+cluster://"):
        assert scheme in line, line  # every form the server accepts


def test_missing_model_directory(tmp_path: Path) -> None:
    line = one_error_line(run_server("--model", str(tmp_path / "nope"), "--auth-disabled",
                                     "--port", "0", "--data-dir", str(tmp_path / "d")))
    assert "--model ($PREFIX_SERVE_MODEL)" in line and "does not exist" in line


def test_directory_that_is_not_a_model(tmp_path: Path) -> None:
    line = one_error_line(run_server("--model", str(tmp_path), "--auth-disabled",
                                     "--port", "0", "--data-dir", str(tmp_path / "d")))
    assert "config.json" in line


def test_hub_id_without_network_fails_at_once(dead_port: int, tmp_path: Path) -> None:
    # The hub endpoint is a local port where nothing listens; the cache is empty.
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{dead_port}", "HF_HUB_CACHE": str(tmp_path / "hub"),
           "HF_HUB_OFFLINE": "0"}
    result = run_server("--model", "some-org/some-model", "--auth-disabled", "--port", "0",
                        "--data-dir", str(tmp_path / "d"), env=env)
    line = one_error_line(result)
    assert "--model ($PREFIX_SERVE_MODEL)" in line and "unreachable" in line
    assert result.stderr.strip() == line  # no retries, nothing printed twice


def test_describe_error_lists_every_bad_setting() -> None:
    with pytest.raises(ValidationError) as info:
        Settings(model="m", auth_disabled=True, port=-1, max_batch_size=0,
                 admin_key="super-secret")
    line = describe_error(info.value)
    assert "--port ($PREFIX_SERVE_PORT)" in line
    assert "--max-batch-size ($PREFIX_SERVE_MAX_BATCH_SIZE)" in line
    assert "\n" not in line and "super-secret" not in line


def test_bind_socket_reports_the_port_in_use(busy_port: int) -> None:
    with pytest.raises(StartupError) as info:
        bind_socket("127.0.0.1", busy_port)
    assert info.value.setting == "port"
    bind_socket("127.0.0.1", 0).close()
