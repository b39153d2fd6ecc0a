"""What the routes share for the life of the app: model, engine, store, resolver, auth, metrics,
tenant quotas.

`Services` is built by the app's lifespan (`server/app.py`) and reached from routes through the
dependency aliases in `deps.py`. `Lifecycle` is the shutdown switch: once flipped (SIGTERM or
lifespan exit), new requests get 503 `shutting_down` while running ones finish within the grace
period and are then cancelled by the engine.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from prefix_registry.store import PrefixStore
from server.api.auth import Authenticator
from server.api.engine_backend import EngineBackend
from server.api.metrics import Metrics
from server.api.prompts import PromptEncoder
from server.api.quotas import QuotaCache
from server.api.rate_limit import TokenRateLimiter
from server.api.resolver import PrefixResolver
from server.engine.engine import Engine
from server.models.loader import ModelInfo
from server.settings import Settings


def default_model_name(model: str) -> str:
    """The base model's name when --served-model-name is not given: a model directory's own
    name (never the filesystem path), or the hub id as given ("Qwen/Qwen3-0.6B")."""
    path = Path(model).expanduser()
    return path.resolve().name if path.is_dir() else model


log = logging.getLogger("prefix_serve.server")


class Lifecycle:
    """Stop admitting, drain the engine within `grace_s`, then it is safe to exit."""

    def __init__(self, engine: EngineBackend, grace_s: float) -> None:
        self._engine = engine
        self._grace_s = grace_s
        self._task: asyncio.Task[None] | None = None

    @property
    def draining(self) -> bool:
        return self._task is not None

    def begin_shutdown(self) -> None:
        """Start draining (idempotent). Must run on the event loop's thread."""
        if self._task is None:
            log.info("shutting down: no new requests; running ones get %.1fs", self._grace_s)
            self._task = asyncio.ensure_future(self._engine.shutdown(self._grace_s))

    async def wait_drained(self) -> None:
        self.begin_shutdown()
        assert self._task is not None
        await self._task


@dataclass
class Services:
    settings: Settings
    loaded: ModelInfo  # the model's weights only where the engine runs in this process
    backend: EngineBackend  # what routes submit to: the local engine or the Ray replicas
    store: PrefixStore
    resolver: PrefixResolver
    auth: Authenticator
    metrics: Metrics
    lifecycle: Lifecycle
    quotas: QuotaCache  # each tenant's quota in force
    rate_limiter: TokenRateLimiter  # tokens per minute per tenant
    prompts: PromptEncoder  # text -> token ids off the event loop
    engine: Engine | None = None  # the engine in this process (None behind Ray Serve)

    @property
    def model_name(self) -> str:
        """The base model's public name (what `/v1/models` lists)."""
        return self.settings.served_model_name or default_model_name(self.loaded.name)

    def is_base_model(self, model_id: str) -> bool:
        """Whether an OpenAI `model` names the base model: its public name, or the --model
        value itself (a path or hub id, as clients written before the short name send)."""
        return model_id in (self.model_name, self.loaded.name)
