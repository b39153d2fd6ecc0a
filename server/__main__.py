"""`prefix-serve` / `python -m server`: check the settings, load the model, serve with uvicorn.

Before anything heavy is imported, the flags are parsed (so `--help` answers at once) and the
port, the registry and the model's source are checked (`server/startup.py`). Any startup error is
one line on stderr naming the flag and its variable, with exit status 2.

SIGTERM / Ctrl-C: uvicorn stops accepting connections and the app stops admitting requests
(503 `shutting_down`) at once; running requests get `--shutdown-grace-s` to finish, after which
the engine cancels them and the process exits.

Connections are limited by the server stack's protocol (`server/connections.py`): a header read
timeout, a header size cap (431) and a connection cap that closes the longest-idle connection for
a new one.

A dead engine never comes back: `/health` turns 503 at once, and (unless
`--no-exit-on-engine-death`) the server shuts down and exits with status 1, so a restart
policy (Docker's, systemd's) or a liveness probe brings a fresh process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from types import FrameType
from typing import NoReturn

import uvicorn
from pydantic import ValidationError

from server.cli_args import PROG, describe_error, parse_settings
from server.settings import Settings
from server.startup import Preflight, StartupError, preflight

log = logging.getLogger("prefix_serve.server")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
EXIT_STARTUP = 2  # like argparse's usage errors: the command as given cannot run
EXIT_ENGINE_DEAD = 1


class GracefulServer(uvicorn.Server):
    """uvicorn's server that also tells the app to drain as soon as a signal arrives, and
    shuts down when `alive()` turns False (the engine died)."""

    def __init__(
        self, config: uvicorn.Config, on_exit: Callable[[], None],
        alive: Callable[[], bool] | None = None,
    ) -> None:
        super().__init__(config)
        self._on_exit, self._alive = on_exit, alive
        self.engine_died = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        with contextlib.suppress(RuntimeError):  # no running loop: nothing to drain
            asyncio.get_running_loop().call_soon_threadsafe(self._on_exit)

    async def on_tick(self, counter: int) -> bool:
        if self._alive is not None and not self.engine_died and not self._alive():
            log.error("the engine is dead: shutting down, exit status %d", EXIT_ENGINE_DEAD)
            self.engine_died = True
            self._on_exit()
        return self.engine_died or await super().on_tick(counter)


EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C


def main(argv: Sequence[str] | None = None) -> None:
    settings = _settings_or_exit(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT)
    try:
        checked = preflight(settings)
    except StartupError as exc:
        _exit(exc.line())
    if settings.replicas is not None:
        checked.sock.close()  # Ray Serve's proxy binds the port itself
        from server.serve_ray.app import run  # Ray is imported only on this path

        with _quiet_interrupt():
            run(settings)
        return
    with _quiet_interrupt():
        _serve(settings, checked)


@contextlib.contextmanager
def _quiet_interrupt() -> Iterator[None]:
    """Ctrl-C: uvicorn (and Ray) drain first, then re-raise the SIGINT as KeyboardInterrupt; by
    then the shutdown is done, so exit with the shell's status for it instead of a traceback."""
    try:
        yield
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)


def _serve(settings: Settings, checked: Preflight) -> None:
    # Imported only now: torch and transformers take seconds to import.
    import torch

    from server.app import create_app, engine_config
    from server.connections import ConnectionLimits, protocol_class
    from server.engine.engine import Engine
    from server.models.loader import ModelLoadError, load_model

    if settings.threads:
        torch.set_num_threads(settings.threads)
    log.info("loading %s (dtype=%s, device=%s, torch threads=%d)", settings.model,
             settings.dtype, settings.device, torch.get_num_threads())
    try:
        loaded = load_model(settings.model, dtype=settings.dtype, device=settings.device,
                            local_files_only=checked.source.local_files_only)
        engine = Engine(loaded, engine_config(settings))
    except ModelLoadError as exc:
        _exit(StartupError("model", str(exc)).line())
    except ValueError as exc:  # engine sizing (KV budget, lengths): the message names the flags
        _exit(StartupError(None, str(exc)).line())
    app = create_app(settings, loaded=loaded, engine=engine)

    def begin_shutdown() -> None:
        services = getattr(app.state, "services", None)
        if services is not None:
            services.lifecycle.begin_shutdown()

    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_config=None, access_log=False,
        log_level=settings.log_level,
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s) + 5,
        http=protocol_class(ConnectionLimits.of(settings, checked.max_connections)),
        ws="none",  # no WebSocket routes: an Upgrade request is served as plain HTTP
    )
    log.info("listening on http://%s:%d once started", settings.host, settings.port)
    alive = (lambda: engine.alive) if settings.exit_on_engine_death else None
    server = GracefulServer(config, begin_shutdown, alive)
    server.run(sockets=[checked.sock])
    if server.engine_died:
        sys.exit(EXIT_ENGINE_DEAD)


def _settings_or_exit(argv: Sequence[str]) -> Settings:
    try:
        return parse_settings(argv)
    except ValidationError as exc:
        _exit(describe_error(exc))


def _exit(message: str) -> NoReturn:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(EXIT_STARTUP)


if __name__ == "__main__":
    main()
