"""`prefix-serve` / `python -m server`: load the model, then serve the app with uvicorn.

SIGTERM / Ctrl-C: uvicorn stops accepting connections and the app stops admitting requests
(503 `shutting_down`) at once; running requests get `--shutdown-grace-s` to finish, after which
the engine cancels them and the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sys
from collections.abc import Callable, Sequence
from types import FrameType

import uvicorn
from pydantic import ValidationError
from pydantic_settings import SettingsError

from server.app import create_app, engine_config
from server.engine.engine import Engine
from server.models.loader import ModelLoadError, load_model
from server.settings import Settings, parse_settings

log = logging.getLogger("prefix_serve.server")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class GracefulServer(uvicorn.Server):
    """uvicorn's server that also tells the app to drain as soon as a signal arrives."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        with contextlib.suppress(RuntimeError):  # no running loop: nothing to drain
            asyncio.get_running_loop().call_soon_threadsafe(self._on_exit)


def main(argv: Sequence[str] | None = None) -> None:
    settings = _settings_or_exit(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT)
    log.info("loading %s (dtype=%s, device=%s)", settings.model, settings.dtype, settings.device)
    try:
        loaded = load_model(settings.model, dtype=settings.dtype, device=settings.device)
        engine = Engine(loaded, engine_config(settings))
    except (ModelLoadError, ValueError) as exc:  # ValueError: engine sizing (KV budget, length)
        sys.exit(f"prefix-serve: error: {exc}")
    app = create_app(settings, loaded=loaded, engine=engine)

    def begin_shutdown() -> None:
        services = getattr(app.state, "services", None)
        if services is not None:
            services.lifecycle.begin_shutdown()

    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_config=None, access_log=False,
        log_level=settings.log_level,
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s) + 5,
    )
    GracefulServer(config, begin_shutdown).run()


def _settings_or_exit(argv: Sequence[str]) -> Settings:
    try:
        return parse_settings(argv)
    except (ValidationError, SettingsError) as exc:
        sys.exit(f"prefix-serve: error: {exc}")


if __name__ == "__main__":
    main()
