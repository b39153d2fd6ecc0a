"""A dead engine takes the server down with exit status 1 (after /health said so), so a
restart policy brings a fresh process; with --no-exit-on-engine-death it stays up, unhealthy."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import torch
import uvicorn

from server.__main__ import GracefulServer
from server.app import create_app, engine_config
from server.engine.engine import Engine
from server.models.loader import LoadedModel
from tests.api.conftest import SettingsFactory
from tests.api.live import wait_for
from tests.engine.helpers import OnForward


def _break(engine: Engine) -> None:
    def fail(work: object) -> None:
        raise torch.AcceleratorError("injected device failure")

    engine.step_hook = OnForward(fail)


@pytest.mark.parametrize("exit_on_death", [True, False])
def test_a_dead_engine_stops_the_server(
    make_settings: SettingsFactory, loaded: LoadedModel, exit_on_death: bool
) -> None:
    settings = make_settings(auth_disabled=True, admin_key=None,
                             exit_on_engine_death=exit_on_death, shutdown_grace_s=1)
    engine = Engine(loaded, engine_config(settings))
    app = create_app(settings, loaded=loaded, engine=engine)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, access_log=False,
                            timeout_graceful_shutdown=5)
    drained = threading.Event()
    server = GracefulServer(config, drained.set, (lambda: engine.alive) if exit_on_death else None)
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 60)
        url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
        assert httpx.get(f"{url}/health").status_code == 200
        _break(engine)
        reply = httpx.post(f"{url}/generate", json={"prompt": "hi", "max_new_tokens": 4},
                           timeout=30)
        assert reply.status_code == 503 and reply.json()["error"]["type"] == "engine_dead"
        if exit_on_death:
            thread.join(30)
            assert not thread.is_alive() and server.engine_died and drained.is_set()
        else:
            time.sleep(1.0)  # ten of uvicorn's ticks: it would have stopped by now
            assert thread.is_alive() and not server.engine_died
            assert httpx.get(f"{url}/health").status_code == 503
    finally:
        server.should_exit = True
        thread.join(30)
