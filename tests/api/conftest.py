"""The real app for the API tests: tiny model, real engine, real Redis (random namespace per test,
removed after) or the embedded local store; in-process ASGI with the lifespan run."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from server.api.state import Services
from server.app import create_app
from server.models.loader import LoadedModel
from server.settings import Settings
from tests.api.helpers import ADMIN_KEY
from tests.redis_ns import REDIS_URL

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
