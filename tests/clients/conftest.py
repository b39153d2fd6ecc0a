"""The real server for the SDK and CLI tests: tiny model, real engine, real Redis (a random
namespace per test, removed after), served by uvicorn on a free loopback port in a thread, so
the blocking client, the async client and `prefixctl` all talk real HTTP to it."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn

import clients
from clients import _async_client, _client
from server.api.state import Services
from server.app import create_app
from server.models.loader import LoadedModel
from server.settings import Settings
from tests.redis_ns import REDIS_URL, delete_namespace, new_namespace

ADMIN_KEY = "sdk-test-operator-key"
START_TIMEOUT_S = 60.0


@dataclass
class LiveServer:
    """A running server: its URL, and a way to run code on its event loop."""

    url: str
    settings: Settings
    services: Services
    loop: asyncio.AbstractEventLoop

    def on_loop(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the server's event loop thread and return its result."""
        async def call() -> Any:
            return fn()
        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(timeout=10)

    def begin_shutdown(self) -> None:
        """What SIGTERM does: new requests get 503 shutting_down, running ones drain."""
        self.on_loop(self.services.lifecycle.begin_shutdown)


class _Runner:
    """uvicorn serving one app on an already-bound socket, on its own thread and loop."""

    def __init__(self, settings: Settings, loaded: LoadedModel) -> None:
        self.app = create_app(settings, loaded=loaded)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        config = uvicorn.Config(self.app, log_level="warning", lifespan="on", timeout_notify=1)
        self.server = uvicorn.Server(config)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="sdk-test-server", daemon=True)

    def _run(self) -> None:
        async def serve() -> None:
            self.loop = asyncio.get_running_loop()
            await self.server.serve(sockets=[self.sock])
        try:
            asyncio.run(serve())
        except BaseException as exc:  # noqa: BLE001 - reported by start()
            self.error = exc

    def start(self, settings: Settings) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self.server.started or self.loop is None:
            raise RuntimeError(f"the test server did not start: {self.error!r}")
        port = self.sock.getsockname()[1]
        return LiveServer(f"http://127.0.0.1:{port}", settings, self.app.state.services,
                          self.loop)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The delays the clients wait between attempts (recorded instead of slept)."""
    recorded: list[float] = []

    async def asleep(delay: float) -> None:
        recorded.append(delay)

    monkeypatch.setattr(_client, "_sleep", recorded.append)
    monkeypatch.setattr(_async_client, "_asleep", asleep)
    return recorded


ServerFactory = Callable[..., LiveServer]


@pytest.fixture
def start_server(
    loaded: LoadedModel, redis_url: str, tmp_path: Path
) -> Iterator[ServerFactory]:
    """Start a server (keyword arguments override its settings); all are stopped after the test
    and their Redis namespaces removed."""
    started: list[tuple[_Runner, str]] = []

    def start(**overrides: Any) -> LiveServer:
        namespace = new_namespace()
        values: dict[str, Any] = dict(
            model=loaded.name, admin_key=ADMIN_KEY, redis_url=REDIS_URL, namespace=namespace,
            data_dir=tmp_path / "data", max_batch_size=4, max_queue=16, kv_cache_mb=1.0,
            prefix_cache_mb=8.0, shutdown_grace_s=2.0, max_upload_mb=1.0,
        )
        values.update(overrides)
        settings = Settings(**values)
        runner = _Runner(settings, loaded)
        started.append((runner, namespace))
        return runner.start(settings)

    yield start
    for runner, namespace in started:
        runner.stop()
        delete_namespace(namespace)


@pytest.fixture
def server(start_server: ServerFactory) -> LiveServer:
    return start_server()


@pytest.fixture
def admin(server: LiveServer) -> Iterator[clients.PrefixClient]:
    with clients.PrefixClient(server.url, ADMIN_KEY) as client:
        yield client


@pytest.fixture
def tenant_key(admin: clients.PrefixClient) -> str:
    """The first key of a fresh tenant `acme`."""
    return admin.create_tenant("acme").api_key


@pytest.fixture
def client(server: LiveServer, tenant_key: str) -> Iterator[clients.PrefixClient]:
    """A blocking client with tenant `acme`'s key."""
    with clients.PrefixClient(server.url, tenant_key) as c:
        yield c
