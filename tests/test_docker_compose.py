"""The container setup, checked without a Docker engine.

`docker-compose config` / `docker compose config` validates the compose file when such a binary is
installed (that part is skipped otherwise; nothing is installed here). The YAML and the Dockerfile
are always parsed and checked, and the health-check script runs against a real HTTP server.
"""

from __future__ import annotations

import http.server
import importlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
HEALTHCHECK = ROOT / "docker" / "healthcheck.py"
SERVER_ENV = ("MODEL", "HOST", "PORT", "REDIS_URL", "ADMIN_KEY", "DEVICE", "DTYPE",
              "SHUTDOWN_GRACE_S")
DEPLOY = ROOT / "deploy"
PUBLISHED = "${PREFIX_SERVE_PUBLISH_ADDRESS:-127.0.0.1}:"


def _compose_commands() -> list[list[str]]:
    commands = []
    if shutil.which("docker-compose"):
        commands.append(["docker-compose"])
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            commands.append(["docker", "compose"])
    return commands


def _compose_config(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*command, "-f", str(COMPOSE), "config"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.mark.parametrize("command", _compose_commands() or [None], ids=lambda c: str(c))
def test_compose_config_validates(command: list[str] | None) -> None:
    if command is None:
        pytest.skip("no docker-compose / docker compose binary installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFIX_SERVE_")}
    refused = _compose_config(command, env | {"PREFIX_SERVE_MODEL": "m"})
    assert refused.returncode != 0 and "PREFIX_SERVE_ADMIN_KEY" in refused.stderr
    refused = _compose_config(command, env | {"PREFIX_SERVE_ADMIN_KEY": "k"})
    assert refused.returncode != 0 and "PREFIX_SERVE_MODEL" in refused.stderr
    result = _compose_config(command, env | {"PREFIX_SERVE_ADMIN_KEY": "k",
                                             "PREFIX_SERVE_MODEL": "m"})
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert services["server"]["environment"]["PREFIX_SERVE_ADMIN_KEY"] == "k"
    assert services["server"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["prometheus"]["profiles"] == ["observability"]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def test_redis_service(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    assert redis["image"] == "redis:7"
    assert redis["healthcheck"]["test"][1:] == ["redis-cli", "ping"]


def test_server_service(compose: dict[str, Any]) -> None:
    server = compose["services"]["server"]
    assert server["build"]["dockerfile"] == "docker/Dockerfile"
    assert (ROOT / server["build"]["context"] / server["build"]["dockerfile"]).is_file()
    assert server["depends_on"] == {"redis": {"condition": "service_healthy"}}
    assert server["ports"] == [PUBLISHED + "${PREFIX_SERVE_PUBLISH_PORT:-8000}:8000"]
    env = server["environment"]
    assert sorted(env) == sorted(f"PREFIX_SERVE_{name}" for name in SERVER_ENV)
    assert env["PREFIX_SERVE_REDIS_URL"] == "redis://redis:6379/0"
    assert (env["PREFIX_SERVE_HOST"], env["PREFIX_SERVE_PORT"]) == ("0.0.0.0", "8000")
    # No default model: an unset one is refused by compose itself, not a crash loop.
    assert env["PREFIX_SERVE_MODEL"].startswith("${PREFIX_SERVE_MODEL:?")
    assert any(volume.split(":")[1] == "/models" for volume in server["volumes"])
    assert any(volume.split(":")[1] == "/home/prefix/.cache/huggingface"
               for volume in server["volumes"])
    check = server["healthcheck"]["test"]
    assert check[0] == "CMD" and "/ready" in check
    assert "prefix-serve-healthcheck" in " ".join(check)


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for unit in sorted(units, key=len, reverse=True):
        if duration.endswith(unit):
            return float(duration[: -len(unit)]) * units[unit]
    return float(duration)


def test_stop_grace_period_outlasts_the_drain(compose: dict[str, Any]) -> None:
    server = compose["services"]["server"]
    drain = float(server["environment"]["PREFIX_SERVE_SHUTDOWN_GRACE_S"])
    # uvicorn waits the grace plus 5 s (server/__main__.py) before it gives up on connections
    assert _seconds(server["stop_grace_period"]) > drain + 5


def test_every_port_is_published_on_the_configured_address(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith(PUBLISHED), (name, port)


def test_observability_profile(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["observability"]
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), source
    scrape = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["scrape_configs"]
    port = services["server"]["environment"]["PREFIX_SERVE_PORT"]
    assert scrape[0]["metrics_path"] == "/metrics"
    assert scrape[0]["static_configs"][0]["targets"] == [f"server:{port}"]
    sources = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"]
    assert sources[0]["url"] == "http://prometheus:9090"
    dashboard = json.loads((DEPLOY / "grafana/dashboards/prefix-serve.json").read_text())
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]}
    assert uids == {sources[0]["uid"]}
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == "/var/lib/grafana/dashboards/prefix-serve.json"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = "\n".join(
        line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")
    ).replace("\\\n", " ")
    rows = [line.split(None, 1) for line in text.splitlines() if line.strip()]
    return [(row[0].upper(), row[1] if len(row) > 1 else "") for row in rows]


def test_dockerfile_base_arg_install_and_entrypoint() -> None:
    instructions = _instructions()
    names = [name for name, _ in instructions]
    assert instructions[0] == ("ARG", "BASE_IMAGE=python:3.11-slim")  # before FROM: global arg
    assert ("FROM", "${BASE_IMAGE}") in instructions
    args = " ".join(value for name, value in instructions if name == "ARG")
    assert "TORCH_VERSION=2.13.0" in args
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in args
    assert any(name == "RUN" and "pip install ." in value for name, value in instructions)
    assert ("CMD", '["prefix-serve"]') in instructions
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["prefix-serve"] == "server.__main__:main"
    assert names.count("HEALTHCHECK") == 1 and "EXPOSE" in names
    health = dict(instructions)["HEALTHCHECK"]
    assert "curl" not in health and "prefix-serve-healthcheck" in health and "/ready" in health


def test_dockerfile_copies_only_what_exists_and_is_not_ignored() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for name, value in _instructions():
        if name == "COPY":
            for source in value.split()[:-1]:
                assert (ROOT / source).exists(), source
                assert source.rstrip("/") not in ignored, source


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        self.send_response(200 if self.path == "/ready" else 503)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture()
def http_port() -> Iterator[int]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _health(port: int, path: str) -> int:
    env = os.environ | {"PREFIX_SERVE_PORT": str(port)}
    result = subprocess.run(
        [sys.executable, str(HEALTHCHECK), path], env=env, capture_output=True, timeout=30
    )
    return result.returncode


def test_healthcheck_script_follows_the_status(http_port: int) -> None:
    assert _health(http_port, "/ready") == 0
    assert _health(http_port, "/not-ready") == 1  # a 503 is unhealthy


@pytest.fixture()
def closed_port() -> Iterator[int]:
    """A local port that is bound but not listening: connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_healthcheck_script_fails_when_nothing_listens(closed_port: int) -> None:
    assert _health(closed_port, "/ready") == 1


# --- profile "ha": Redis with Sentinel, two engine replicas behind Ray Serve -------------------

HA_SERVICES = ("redis-replica-1", "redis-replica-2", "sentinel-1", "sentinel-2", "sentinel-3",
               "server-ray")


def test_ha_profile_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in HA_SERVICES:
        assert services[name]["profiles"] == ["ha"], name
    assert "profiles" not in services["redis"] and "profiles" not in services["server"]
    for name in ("redis-replica-1", "redis-replica-2"):
        command = services[name]["command"]
        assert command[command.index("--replicaof") + 1:][:2] == ["redis", "6379"]
    server = services["server-ray"]
    assert server["command"] == ["prefix-serve", "--replicas", "2"]
    assert server["build"]["args"]["EXTRAS"] == "[ray]"
    assert server["depends_on"] == {
        f"sentinel-{i}": {"condition": "service_healthy"} for i in (1, 2, 3)}
    assert int(server["shm_size"].removesuffix("gb")) >= 1


def _sentinel_lines(compose: dict[str, Any]) -> list[str]:
    """The sentinel.conf lines that the sentinel services write at start."""
    command = compose["services"]["sentinel-1"]["command"][0]
    printed = command.split(">", 1)[0].removeprefix("printf '%s\\n'")
    return shlex.split(printed)


def test_ha_profile_url_names_the_sentinels_and_their_service(compose: dict[str, Any]) -> None:
    from prefix_registry.redis_connect import parse_redis_url

    url = compose["services"]["server-ray"]["environment"]["PREFIX_SERVE_REDIS_URL"]
    target = parse_redis_url(url)
    assert target.topology == "sentinel"
    assert sorted(target.nodes) == [(f"sentinel-{i}", 26379) for i in (1, 2, 3)]
    monitor = next(line for line in _sentinel_lines(compose) if "sentinel monitor" in line)
    assert monitor.split()[2:] == [target.service, "redis", "6379", "2"]  # quorum 2 of 3


def test_ha_profile_sentinel_config_runs_on_a_real_sentinel(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    """The profile's sentinel.conf, pointed at a real primary on loopback, monitors it."""
    from tests.redis_procs import free_port, missing_binaries

    if missing_binaries():
        pytest.skip(str(missing_binaries()))
    primary_port, sentinel_port = free_port(), free_port()
    primary = subprocess.Popen(["redis-server", "--port", str(primary_port), "--save", "",
                                "--bind", "127.0.0.1"], stdout=subprocess.DEVNULL)
    lines = [line.replace(" redis 6379 ", f" 127.0.0.1 {primary_port} ")
                 .replace("port 26379", f"port {sentinel_port}")
             for line in _sentinel_lines(compose)]
    conf = tmp_path / "sentinel.conf"
    conf.write_text("\n".join([*lines, "bind 127.0.0.1"]) + "\n")
    sentinel = subprocess.Popen(["redis-server", str(conf), "--sentinel"],
                                stdout=subprocess.DEVNULL)
    try:
        import redis

        client = redis.Redis(port=sentinel_port, socket_timeout=2)
        deadline = time.monotonic() + 30
        while True:
            try:
                address = client.sentinel_get_master_addr_by_name("prefix-serve")
                break
            except redis.RedisError:
                assert time.monotonic() < deadline, "the sentinel did not start"
                time.sleep(0.2)
        assert int(address[1]) == primary_port
    finally:
        for process in (sentinel, primary):
            process.terminate()
            process.wait(10)


def test_dockerfile_installs_extras_on_request() -> None:
    instructions = _instructions()
    assert ("ARG", 'EXTRAS=""') in instructions
    assert any(name == "RUN" and 'pip install ."${EXTRAS}"' in value
               for name, value in instructions)


def test_ray_serve_config_builds_the_app(monkeypatch: pytest.MonkeyPatch) -> None:
    """deploy/ray-serve.yaml is a valid Ray Serve config whose import path builds the app and
    whose deployments exist in it."""
    schema = pytest.importorskip("ray.serve.schema")
    config = yaml.safe_load((ROOT / "deploy" / "ray-serve.yaml").read_text())
    schema.ServeDeploySchema.model_validate(config)
    [app_config] = config["applications"]
    module, _, name = app_config["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), name)
    monkeypatch.setenv("PREFIX_SERVE_ADMIN_KEY", "k")
    app = builder(app_config["args"])
    ingress = app._bound_deployment
    engine = ingress.init_args[0]._bound_deployment
    assert {d["name"] for d in app_config["deployments"]} == {ingress._name, engine._name}
