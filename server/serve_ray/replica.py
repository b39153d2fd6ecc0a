"""The engine deployment: one model and one `Engine` per replica (one GPU each, or CPU).

Requests arrive from the ingress with the prefix stripped; the multiplexed model id names it
(`tenant/name@version`), and the replica loads it through its own registry resolver, which the
registry's pub/sub keeps fresh. Ray Serve's multiplexing LRU (`--max-prefixes-per-replica`)
decides which prefixes this replica advertises to the router; the engine's device prefix cache
keeps their K/V by content hash, so a prefix the router sends here is computed once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import torch
from ray import serve

from prefix_registry.errors import RegistryError
from server.api.errors import to_serve_error
from server.app import engine_config, open_registry
from server.engine.engine import Engine
from server.engine.request import EngineRequest, Event, PrefixSource
from server.models.loader import LoadedModel, ModelSummary, load_model
from server.serve_ray.messages import Accepted, Refused, ReplicaInfo, split_model_id
from server.serve_ray.metrics import ReplicaMetrics
from server.settings import Settings

log = logging.getLogger("prefix_serve.replica")
Message = Accepted | Refused | Event


TYPICAL_PREFIX_TOKENS = 32  # for sizing the multiplexing LRU from the device prefix cache
MAX_PREFIXES_PER_REPLICA = 4096


def prefixes_per_replica(settings: Settings, loaded: LoadedModel) -> int:
    """The multiplexing LRU's size: what the router may believe is warm here should fit the
    device prefix cache, so by default it is as many typical prefixes as that cache holds."""
    if settings.max_prefixes_per_replica is not None:
        return settings.max_prefixes_per_replica
    fp = loaded.fingerprint
    per_token = 2 * fp.num_layers * fp.num_kv_heads * fp.head_dim * loaded.dtype.itemsize
    fits = settings.prefix_cache_bytes // (per_token * TYPICAL_PREFIX_TOKENS)
    return max(1, min(MAX_PREFIXES_PER_REPLICA, fits))


class EngineReplica:
    """Deployed by `app.build_app` with `serve.deployment(...)` options from the settings."""

    async def __init__(self, settings: Settings) -> None:  # type: ignore[misc]  # Ray Serve awaits it
        self._settings = settings
        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.loaded = await asyncio.to_thread(
            load_model, settings.model, dtype=settings.dtype, device=settings.device
        )
        self.engine = Engine(self.loaded, engine_config(settings))
        self.engine.start()
        self.store, self.resolver = await open_registry(settings, self.loaded.fingerprint)
        self.replica = serve.get_replica_context().replica_id.unique_id

        async def load_prefix(model_id: str) -> PrefixSource:  # a closure, as Ray's LLM server
            tenant, ref = split_model_id(model_id)
            return await self.resolver.resolve(tenant, ref)

        self._load_prefix: Callable[[str], Awaitable[PrefixSource]] = serve.multiplexed(
            max_num_models_per_replica=prefixes_per_replica(settings, self.loaded)
        )(load_prefix)
        self._metrics = ReplicaMetrics(self.replica, self.engine.stats)
        log.info("engine replica %s ready: %s", self.replica, self.engine.stats())

    def describe(self) -> ModelSummary:
        """The model without its weights, for the ingress."""
        return self.loaded.summary()

    def replica_info(self) -> ReplicaInfo:
        """Which replica and process this is, and its engine's counters (for operators; call it
        with a prefix's model id to ask the replica that holds that prefix)."""
        return ReplicaInfo(self.replica, os.getpid(), socket.gethostname(), self.engine.stats())

    async def generate(self, request: EngineRequest) -> AsyncIterator[Message]:
        """`Accepted` then the engine's events, or one `Refused`. Cancelling the call (the
        client went away) cancels the engine request."""
        try:
            model_id = serve.get_multiplexed_model_id()
            prefix = await self._load_prefix(model_id) if model_id else None
            stream = self.engine.submit(dataclasses.replace(request, prefix=prefix))
        except Exception as exc:
            error = to_serve_error(exc)
            if error is None:
                raise
            # A registry error goes as its own class (its only definition); the caller's error
            # handler maps it again.
            cls = type(exc) if isinstance(exc, RegistryError) else type(error)
            yield Refused(cls, error.message, getattr(error, "retry_after", None))
            return
        yield Accepted(self.replica)
        try:
            async for event in stream:
                yield event
        finally:
            stream.cancel()  # no-op once finished

    def check_health(self) -> None:
        """Ray Serve calls this periodically; a dead engine makes Ray replace the replica."""
        if not self.engine.alive:
            raise RuntimeError(f"the engine died: {self.engine.fatal_error}")

    async def __del__(self) -> None:
        """Ray Serve's graceful stop: running requests get the grace period, then the rest."""
        self._metrics.close()
        await self.engine.shutdown(self._settings.shutdown_grace_s)
        await self.resolver.close()
        await self.store.close()
