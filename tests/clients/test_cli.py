"""`prefixctl` against the real server: `main([...])` with stdout, stderr and exit codes captured;
and the installed `prefixctl` script and `python -m clients.cli` as real processes."""

from __future__ import annotations

import functools
import io
import json
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import save_file

from clients import API_KEY_ENV, BASE_URL_ENV
from clients.cli import EXIT_API_ERROR, EXIT_CONNECTION, EXIT_OK, EXIT_USAGE, main
from server.models.loader import LoadedModel
from tests.api.helpers import decode, prefix_tensors, reference_greedy
from tests.clients.conftest import ADMIN_KEY, LiveServer

Captured = tuple[int, str, str]
Ctl = Callable[..., Captured]


@pytest.fixture
def ctl(server: LiveServer, capsys: pytest.CaptureFixture[str]) -> Ctl:
    """Run prefixctl against the test server with `key`; returns (exit code, stdout, stderr)."""
    def run(*args: str, key: str | None = ADMIN_KEY) -> Captured:
        capsys.readouterr()
        auth = ["--api-key", key] if key else []
        code = main(["--base-url", server.url, *auth, *args])
        out, err = capsys.readouterr()
        return code, out, err
    return run


def test_tenant_commands(ctl: Ctl) -> None:
    code, out, err = ctl("tenant", "create", "acme")
    assert code == EXIT_OK and out.startswith("created tenant acme") and "shown only once" in err
    code, out, _ = ctl("tenant", "create-key", "acme", "--json")
    second = json.loads(out)
    assert code == EXIT_OK and second["name"] == "acme" and second["api_key"]
    code, out, _ = ctl("--json", "tenant", "list")
    (tenant,) = json.loads(out)
    assert tenant["name"] == "acme" and second["key_id"] in {k["key_id"] for k in tenant["keys"]}
    code, out, _ = ctl("tenant", "list")
    assert out.splitlines()[0].split() == ["TENANT", "KEY", "IDS"] and "acme" in out
    assert ctl("tenant", "revoke-key", "acme", second["key_id"])[1] == \
        f"revoked {second['key_id']}\n"
    code, out, err = ctl("tenant", "create", "acme")
    assert (code, out) == (EXIT_API_ERROR, "") and err.startswith("error: conflict: ")
    assert len(err.splitlines()) == 1
    code, out, err = ctl("tenant", "create", "initech", "--print-key")
    assert code == EXIT_OK and out.startswith("psk-") and len(out.split()) == 1 and err == ""
    code, out, _ = ctl("tenant", "create-key", "initech", "--print-key")
    assert code == EXIT_OK and out.startswith("psk-") and len(out.split()) == 1


def test_prefix_commands_and_generation(
    ctl: Ctl, loaded: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = json.loads(ctl("tenant", "create", "acme", "--json")[1])["api_key"]
    monkeypatch.setenv(API_KEY_ENV, key)  # the prefix commands below use the tenant's key
    ctl = functools.partial(ctl, key=None)
    tensors = prefix_tensors(loaded, "kv", prefix_len=3)
    path = tmp_path / "style.safetensors"
    save_file(tensors, str(path))
    code, out, _ = ctl("upload", "style", str(path), "--description", "from a file")
    assert code == EXIT_OK and out.startswith("uploaded style version 1 (kv, prefix_len 3")
    code, out, _ = ctl("upload", "style", str(path), "--json")
    assert json.loads(out)["version"] == 2
    code, out, _ = ctl("list")
    header, row = out.splitlines()
    assert header.split()[:3] == ["NAME", "VERSION", "TENANT"] and row.split()[:4] == [
        "style", "2", "acme", "kv"]
    assert [p["name"] for p in json.loads(ctl("list", "--json")[1])] == ["style"]
    code, out, _ = ctl("show", "style")
    assert "description: from a file" not in out and "versions:" in out  # latest has none
    assert [v["version"] for v in json.loads(ctl("show", "style", "--json")[1])["versions"]] \
        == [2, 1]

    expected = decode(loaded, reference_greedy(loaded, "hello world", 6, tensors))
    code, out, err = ctl("generate", "-p", "style", "hello world", "-n", "6")
    assert (code, out, err) == (EXIT_OK, expected + "\n", "")
    code, out, err = ctl("generate", "-p", "style@1", "hello world", "-n", "6", "--no-stream",
                         "--usage")
    assert out == expected + "\n" and err.startswith("[") and "prefix style@1 (3 tokens)" in err
    code, out, _ = ctl("generate", "-p", "style", "hello world", "-n", "6", "--json")
    assert json.loads(out)["text"] == expected
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello world"))
    assert ctl("generate", "-p", "style", "-", "-n", "6")[1] == expected + "\n"

    assert ctl("delete", "style", "--version", "1") == (EXIT_OK, "deleted 1 version of style\n",
                                                       "")
    assert json.loads(ctl("delete", "style", "--json")[1]) == {"deleted": 1}
    code, out, err = ctl("show", "style")
    assert code == EXIT_API_ERROR and out == ""
    assert err.startswith("error: not_found: ") and "style" in err


def test_operator_acts_for_a_tenant(ctl: Ctl, loaded: LoadedModel, tmp_path: Path) -> None:
    ctl("tenant", "create", "globex")
    save_file(prefix_tensors(loaded, "p_theta", prefix_len=4), str(tmp_path / "p.safetensors"))
    code, out, _ = ctl("upload", "seed", str(tmp_path / "p.safetensors"), "--tenant", "globex")
    assert code == EXIT_OK and "(p_theta, prefix_len 4" in out
    assert json.loads(ctl("list", "--tenant", "globex", "--json")[1])[0]["tenant"] == "globex"
    assert ctl("list", "--tenant", "nobody")[0] == EXIT_API_ERROR
    code, out, _ = ctl("generate", "-p", "seed", "hello", "-n", "2", "--tenant", "globex")
    assert code == EXIT_OK and out.endswith("\n")
    # --tenant also works before the command, like --api-key
    code, out, _ = ctl("--tenant", "globex", "list")
    assert code == EXIT_OK and "seed" in out and out.splitlines()[0].split()[-1] == "USABLE"
    code, out, _ = ctl("--tenant", "globex", "generate", "-p", "seed", "hello", "-n", "2")
    assert code == EXIT_OK
    # Without it the operator acts for 'default', and the error says how to name a tenant.
    code, out, err = ctl("list")
    assert code == EXIT_API_ERROR and "prefixctl --tenant NAME" in err
    code, out, err = ctl("generate", "-p", "seed", "hello", "-n", "2")
    assert code == EXIT_API_ERROR and "not_found" in err and "X-Tenant" in err


def test_usage_errors_exit_2(ctl: Ctl, tmp_path: Path) -> None:
    code, out, err = ctl("upload", "x", str(tmp_path / "missing.safetensors"))
    assert (code, out) == (EXIT_USAGE, "") and err.startswith("error: usage: no such file")
    (tmp_path / "adapter_config.json").write_text("{}")
    assert ctl("upload", "x", str(tmp_path))[0] == EXIT_USAGE
    assert ctl("generate")[0] == EXIT_USAGE  # argparse: missing prompt
    assert ctl("frobnicate")[0] == EXIT_USAGE
    assert ctl("delete", "x", "--version", "one")[0] == EXIT_USAGE
    assert main(["--help"]) == EXIT_OK


def test_api_and_connection_errors(ctl: Ctl, server: LiveServer) -> None:
    code, _, err = ctl("list", key="psk-wrong")
    assert code == EXIT_API_ERROR and err.startswith("error: authentication_error: ")
    code, _, err = ctl("generate", "hi", "--temperature", "-1")
    assert code == EXIT_API_ERROR and err.startswith("error: validation_error: ")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code = main(["--base-url", f"http://127.0.0.1:{port}", "--max-retries", "0", "health"])
    assert code == EXIT_CONNECTION


def test_ready_and_environment(
    server: LiveServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(BASE_URL_ENV, server.url)
    monkeypatch.setenv(API_KEY_ENV, ADMIN_KEY)
    assert main(["tenant", "create", "envco", "--json"]) == EXIT_OK  # key from the environment
    assert main(["ready"]) == EXIT_OK
    assert capsys.readouterr().out.endswith("ready\n  model: ok\n  engine: ok\n  registry: ok\n")
    server.begin_shutdown()
    assert main(["ready", "--json"]) == EXIT_API_ERROR
    assert json.loads(capsys.readouterr().out)["status"] == "shutting_down"
    code = main(["generate", "hi", "--max-retries", "0"])
    assert code == EXIT_API_ERROR
    assert capsys.readouterr().err.startswith("error: shutting_down: ")


def test_installed_script_and_module(server: LiveServer) -> None:
    env = {"PATH": str(Path(sys.executable).parent), BASE_URL_ENV: server.url}
    script = shutil.which("prefixctl", path=env["PATH"])
    assert script is not None, "prefixctl is not installed (pip install -e .)"
    done = subprocess.run([script, "health"], capture_output=True, text=True, env=env,
                          timeout=60)
    assert (done.returncode, done.stdout) == (0, "ok\n"), done.stderr
    done = subprocess.run([sys.executable, "-m", "clients.cli", "show", "x"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == EXIT_API_ERROR and done.stdout == ""
    assert done.stderr.startswith("error: authentication_error: ")
    assert len(done.stderr.splitlines()) == 1


def test_show_prints_the_training_block(capsys: pytest.CaptureFixture[str]) -> None:
    from clients._cli_output import prefix_detail
    from clients._types import PrefixDetail

    detail = PrefixDetail(name="formal", version=1, form="p_theta", prefix_len=10,
                          dtype="float32", sha256="ab", size_bytes=20480, created_at=0.0,
                          training={"steps": 140, "val_loss": 0.15}, compatible=False,
                          incompatible_reason="prefix was made for another model")
    prefix_detail(detail, as_json=False)
    out = capsys.readouterr().out
    assert "training:" in out and "steps:" in out and "140" in out and "0.15" in out
    assert "usable:      no: prefix was made for another model" in out
