"""The real app for the API tests: tiny model, real engine, real Redis (random namespace per test,
removed after) or the embedded local store; in-process ASGI with the lifespan run."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi import FastAPI

from server.api.state import Services
from server.app import create_app
from server.models.loader import LoadedModel, load_model
from server.settings import Settings
from tests.api.helpers import ADMIN_KEY

REDIS_URL = "redis://127.0.0.1:6379/0"
RUN_NAMESPACE = f"prefix-serve-api-test-{uuid.uuid4().hex[:8]}"


def delete_namespace(namespace: str) -> None:
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=2)
    try:
        keys = list(client.scan_iter(match=f"{namespace}*", count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i : i + 500])
    finally:
        client.close()


@pytest.fixture(scope="session")
def loaded(tiny_model_dir: Callable[..., Path]) -> LoadedModel:
    """One tiny Llama loaded through the user's path, shared by every app (it is frozen)."""
    return load_model(str(tiny_model_dir("llama")), dtype="float32")


@pytest.fixture(scope="session")
def redis_available() -> Iterator[None]:
    try:
        redis.Redis.from_url(REDIS_URL, socket_timeout=1, socket_connect_timeout=1).ping()
    except redis.RedisError as e:
        pytest.skip(f"Redis at {REDIS_URL} does not answer ({e})")
    yield
    delete_namespace(RUN_NAMESPACE)


@pytest.fixture
def namespace(redis_available: None) -> Iterator[str]:
    ns = f"{RUN_NAMESPACE}-{uuid.uuid4().hex[:8]}:"
    yield ns
    delete_namespace(ns)


SettingsFactory = Callable[..., Settings]


@pytest.fixture
def make_settings(loaded: LoadedModel, namespace: str, tmp_path: Path) -> SettingsFactory:
    """Settings for a small server on the real Redis; keyword arguments override."""
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = dict(
            model=loaded.name, admin_key=ADMIN_KEY, redis_url=REDIS_URL, namespace=namespace,
            data_dir=tmp_path / "data", max_batch_size=4, max_queue=16, kv_cache_mb=1.0,
            prefix_cache_mb=8.0, shutdown_grace_s=2.0, max_upload_mb=1.0,
        )
        values.update(overrides)
        return Settings(**values)

    return make


@dataclass
class Served:
    app: FastAPI
    client: httpx.AsyncClient

    @property
    def services(self) -> Services:
        services: Services = self.app.state.services
        return services


@asynccontextmanager
async def serve(settings: Settings, loaded: LoadedModel) -> AsyncIterator[Served]:
    """The app with its lifespan running, and a client talking to it in-process."""
    app = create_app(settings, loaded=loaded)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test",
                                     timeout=60) as client:
            yield Served(app, client)


@pytest.fixture
async def server(make_settings: SettingsFactory, loaded: LoadedModel) -> AsyncIterator[Served]:
    async with serve(make_settings(), loaded) as served:
        yield served
