"""Checks that run before the model loads, so a wrong setting costs a second, not a minute.

In order: the port (bound here and handed to uvicorn, so nothing can take it while the model
loads), the registry (one ping through the same store the server will use), and the model's
source (`server.models.source`). Each failure is a `StartupError` naming its flag and variable;
`prefix-serve` prints it as one line and exits with status 2.

The open-files limit is fitted to `--max-connections` here too: the soft limit is raised toward
the hard one as far as the connections and a reserve for everything else need; where even the
hard limit is too low, the connection cap is lowered to fit, with a warning, rather than let
`accept` fail with EMFILE (which stops every new connection, `/health` included).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import socket
from dataclasses import dataclass

from server.cli_args import env_var, flag
from server.models.source import ModelSource, ModelSourceError, check_model_source
from server.settings import Settings

log = logging.getLogger("prefix_serve.server")
REGISTRY_TIMEOUT_S = 3.0
FD_RESERVE = 256  # files besides client connections: model files, threads, logs, listeners


class StartupError(Exception):
    """A setting that cannot work; `setting` is the field name (None: not one setting's fault)."""

    def __init__(self, setting: str | None, message: str) -> None:
        super().__init__(message)
        self.setting = setting
        self.message = message

    def line(self) -> str:
        """One line for the terminal: the flag and variable, then what is wrong."""
        text = " ".join(self.message.split())  # a multi-line library message on one line
        if self.setting is None:
            return text
        return f"{flag(self.setting)} (${env_var(self.setting)}): {text}"


@dataclass
class Preflight:
    sock: socket.socket  # bound, not yet listening: uvicorn listens once the app is ready
    source: ModelSource
    max_connections: int  # --max-connections, lowered if the open-files limit cannot hold it


def preflight(settings: Settings) -> Preflight:
    """Run every check; the socket is closed again if a later check fails."""
    sock = bind_socket(settings.host, settings.port)
    try:
        check_registry(settings)
        source = check_model(settings.model)
    except BaseException:
        sock.close()
        raise
    return Preflight(sock, source, fit_open_files(settings))


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), as uvicorn would bind it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise _bind_error(host, port, exc) from exc
    sock.set_inheritable(True)
    return sock


def _bind_error(host: str, port: int, exc: OSError) -> StartupError:
    if exc.errno == errno.EADDRINUSE:
        return StartupError("port", f"{host}:{port} is already in use (another server is "
                                    "running there: stop it, or pick another port)")
    if exc.errno == errno.EACCES:
        return StartupError("port", f"no permission to listen on port {port} (ports below 1024 "
                                    "need privileges)")
    return StartupError("host", f"cannot listen on {host}:{port}: {exc.strerror or exc}")


def check_registry(settings: Settings, timeout_s: float = REGISTRY_TIMEOUT_S) -> None:
    """Open the configured store and ping it once."""
    from prefix_registry.factory import open_store  # the registry imports torch: after --help

    async def ping() -> None:
        store = open_store(settings.redis_url, directory=settings.data_dir)
        try:
            await asyncio.wait_for(store.ping(), timeout_s)
        finally:
            await store.close()

    setting = "redis_url" if settings.redis_url else "data_dir"
    where = settings.store_description
    try:
        asyncio.run(ping())
    except TimeoutError as exc:
        raise StartupError(setting, f"{where} did not answer within {timeout_s:g}s") from exc
    except Exception as exc:
        reason = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        raise StartupError(setting, f"cannot use {where}: {reason}") from exc


def check_model(model: str) -> ModelSource:
    try:
        return check_model_source(model)
    except ModelSourceError as exc:
        raise StartupError("model", str(exc)) from exc


def fit_open_files(settings: Settings) -> int:
    """The connection cap this process can hold open: RLIMIT_NOFILE's soft limit is raised as
    far as needed (up to the hard limit); if that is not enough, the cap is lowered to fit."""
    reserve = FD_RESERVE + settings.redis_max_connections
    needed = settings.max_connections + reserve
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return settings.max_connections
    fitted = max(soft - reserve, 8)
    log.warning("%s (%d) does not fit the open-files limit (%d, of which %d are kept for the "
                "rest): serving at most %d connections; raise `ulimit -n` to allow more",
                flag("max_connections"), settings.max_connections, soft, reserve, fitted)
    return fitted
