"""A real prefix-serve server for the CLI upload test: the tiny model, the engine, the embedded
local store, served by uvicorn on a free loopback port in a thread."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from server.app import create_app
from server.models.loader import LoadedModel
from server.settings import Settings

ADMIN_KEY = "training-test-operator-key"


@contextlib.contextmanager
def live_server(loaded: LoadedModel, data_dir: Path) -> Iterator[str]:
    """Yields the base URL of a started server; stops it afterwards."""
    settings = Settings(model=loaded.name, admin_key=ADMIN_KEY, data_dir=data_dir,
                        max_batch_size=4, kv_cache_mb=1.0, prefix_cache_mb=8.0,
                        shutdown_grace_s=1.0)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(settings, loaded=loaded),
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])),
                              daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        if not server.started:
            raise RuntimeError("the test server did not start")
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
