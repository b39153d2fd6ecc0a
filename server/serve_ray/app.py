"""Building and running the Ray Serve application.

`prefix-serve --replicas N` calls `run(settings)`: it starts (or joins, `--ray-address`) a Ray
cluster, serves the app on `--host`/`--port` through Ray Serve's proxy, and on SIGTERM / Ctrl-C
stops it. A Ray Serve config file names `server.serve_ray.app:app_builder` instead
(deploy/ray-serve.yaml), so `serve deploy` and KubeRay run the same application.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

import ray
import torch
from ray import serve
from ray.serve import Application

from server.serve_ray.ingress import Ingress
from server.serve_ray.replica import EngineReplica
from server.settings import Settings

log = logging.getLogger("prefix_serve.ray")
APP_NAME = "prefix-serve"
HEALTH_CHECK_PERIOD_S = 5.0
SHUTDOWN_MARGIN_S = 5.0  # beyond the drain: closing the registry, stopping the engine thread


def build_app(settings: Settings) -> Application:
    """The ingress bound to the engine deployment, both sized from `settings`."""
    gpus = _gpus(settings)
    # A config file's autoscaling_config replaces a replica count: set one only when asked.
    count: dict[str, Any] = {"num_replicas": settings.replicas} if settings.replicas else {}
    engine = serve.deployment(
        name="EngineReplica",
        **count,
        ray_actor_options={"num_cpus": settings.replica_cpus, "num_gpus": gpus},
        # the engine queues and batches: let the router hand it as much as it can queue
        max_ongoing_requests=settings.max_batch_size + settings.max_queue,
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
        graceful_shutdown_timeout_s=settings.shutdown_grace_s + SHUTDOWN_MARGIN_S,
    )(EngineReplica)
    ingress = serve.deployment(
        name="Ingress",
        num_replicas=settings.ingress_replicas,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=4 * (settings.max_batch_size + settings.max_queue),
        graceful_shutdown_timeout_s=settings.shutdown_grace_s + SHUTDOWN_MARGIN_S,
    )(Ingress)
    return ingress.bind(engine.bind(replica_settings(settings, gpus)), settings)


def replica_settings(settings: Settings, gpus: float) -> Settings:
    """Replicas that share a device share its KV budget, unless --kv-cache-mb fixes it: CPU
    replicas split the RAM share among the replicas asked for (on one machine they would
    otherwise each take it), replicas on a fraction of a GPU take that fraction of its memory."""
    if settings.kv_cache_mb is not None:
        return settings
    if gpus == 0:
        share = settings.cpu_kv_fraction / (settings.replicas or 1)
        return settings.model_copy(update={"cpu_kv_fraction": share})
    if gpus < 1:
        share = settings.gpu_memory_utilization * gpus
        return settings.model_copy(update={"gpu_memory_utilization": share})
    return settings


def app_builder(args: dict[str, Any]) -> Application:
    """For Ray Serve config files: `args` are the settings (the deployments' options in the
    file override replica counts, autoscaling and resources)."""
    return build_app(Settings(**args))


def _gpus(settings: Settings) -> float:
    if settings.replica_gpus is not None:
        return settings.replica_gpus
    return 1.0 if settings.device != "cpu" and torch.cuda.is_available() else 0.0


def start(settings: Settings) -> str:
    """Connect to Ray, deploy, and return the HTTP URL once every replica is up.

    Ray's own chatter stays out of the terminal: its actors' logs (the controller's and proxy's
    INFO lines, colour-coded, and the raylet's note that the controller was killed on a clean
    stop) are not streamed to this process unless --log-level is debug; they stay in Ray's log
    directory (/tmp/ray/session_latest/logs), and Serve's own components log warnings only."""
    verbose = settings.log_level == "debug"
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # no colour codes in what is streamed
    if not ray.is_initialized():
        ray.init(address=settings.ray_address, include_dashboard=False,
                 logging_level=logging.DEBUG if verbose else logging.ERROR,
                 log_to_driver=verbose)
    if not verbose:  # Serve's client in this process: "Started Serve in namespace ..."
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    serve.start(http_options={"host": settings.host, "port": settings.port},
                logging_config={"log_level": "DEBUG" if verbose else "WARNING"})
    serve.run(build_app(settings), name=APP_NAME, route_prefix="/")
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    return f"http://{host}:{settings.port}"


def stop() -> None:
    """Delete the application (its replicas drain), then disconnect: a local Ray cluster stops
    with it; on a joined cluster (--ray-address) Serve itself stays up for its other apps.

    Not `serve.shutdown()`: it kills the Serve controller while its graceful_shutdown task is
    still pending, and the raylet then prints "ServeController.graceful_shutdown failed" on
    every clean stop."""
    serve.delete(APP_NAME)
    ray.shutdown()


def run(settings: Settings) -> None:
    """Serve until SIGTERM or Ctrl-C."""
    stopping = threading.Event()
    url = start(settings)
    for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs its own
        signal.signal(sig, lambda *_: stopping.set())
    log.info("serving %s with %d engine replicas on %s", settings.model,
             settings.replicas or 1, url)
    stopping.wait()
    log.info("stopping: replicas get %.1fs to finish running requests", settings.shutdown_grace_s)
    stop()
