"""One local Ray cluster and one Ray Serve application for the whole module (starting them costs
most of the time): the tiny model, 2 engine replicas, 2 ingress replicas, the real Redis."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from server.settings import Settings
from tests.api.helpers import ADMIN_KEY, auth
from tests.redis_ns import delete_namespace, new_namespace

ray = pytest.importorskip("ray")


@dataclass
class RayServed:
    url: str
    settings: Settings
    key: str  # an API key of tenant "acme"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def ray_served(tiny_model_dir: Callable[..., Path], redis_url: str) -> Iterator[RayServed]:
    from server.serve_ray import app as serve_app

    namespace = new_namespace()
    settings = Settings(
        model=str(tiny_model_dir("llama")), admin_key=ADMIN_KEY, redis_url=redis_url,
        namespace=namespace, port=_free_port(), replicas=2, ingress_replicas=2,
        replica_cpus=0.5, replica_gpus=0, dtype="float32", device="cpu", max_batch_size=2,
        max_queue=16, kv_cache_mb=1.0, prefix_cache_mb=8.0, shutdown_grace_s=1.0,
    )
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        url = serve_app.start(settings)
        response = httpx.post(f"{url}/admin/tenants", headers=auth(ADMIN_KEY),
                              json={"name": "acme"}, timeout=60)
        assert response.status_code == 201, response.text
        yield RayServed(url, settings, response.json()["api_key"])
    finally:
        serve_app.stop()
        delete_namespace(namespace, redis_url)
