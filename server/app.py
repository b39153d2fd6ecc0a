"""The app factory: routers, error handlers, middleware, and the lifespan that owns the services.

Startup loads the model (in a thread), opens the registry, subscribes the prefix cache to its
changes and starts the engine; shutdown stops admitting, lets running requests finish within the
grace period (then the engine cancels them), and closes the registry.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from prefix_registry import errors as reg
from prefix_registry.factory import open_store
from prefix_registry.fingerprint import ModelFingerprint
from prefix_registry.store import PrefixStore
from prefix_registry.validation import Limits
from server.api import admin_prefixes, admin_quotas, admin_tenants, generate, health, openai
from server.api.auth import DEFAULT_TENANT, Authenticator
from server.api.engine_backend import EngineBackend, LocalBackend
from server.api.errors import install_error_handlers
from server.api.guard import RequestGuard
from server.api.key_cache import KeyCache
from server.api.metrics import Metrics, MetricsListener, serve_metrics
from server.api.middleware import RequestContextMiddleware
from server.api.prompts import PromptEncoder
from server.api.quotas import Quota, QuotaCache
from server.api.rate_limit import rate_limiter_for
from server.api.resolver import PrefixResolver
from server.api.state import Lifecycle, Services
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.models.loader import LoadedModel, ModelInfo, load_model
from server.settings import Settings

log = logging.getLogger("prefix_serve.server")
API_VERSION = "1"


def create_app(
    settings: Settings, *, loaded: ModelInfo | None = None,
    engine: Engine | EngineBackend | None = None,
) -> FastAPI:
    """Build the app. The model is loaded at startup unless `loaded` is given (the CLI loads it
    first to fail fast; tests share one); likewise the engine (`engine`, not yet started): a
    local `Engine`, or another `EngineBackend` (the Ray Serve replicas, with a `ModelSummary`)."""
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = await start_services(settings, metrics, loaded, engine)
        app.state.services = services
        app.state.metrics_listener = _metrics_listener(settings, metrics)
        try:
            yield
        finally:
            if app.state.metrics_listener is not None:
                app.state.metrics_listener.close()
            await stop_services(services)

    app = FastAPI(
        title="prefix-serve",
        version=API_VERSION,
        summary="Many tenants' Prefix-Tuning adapters on one frozen model, batched together",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.add_middleware(RequestGuard)  # inside the request context: its refusals are logged
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    for module in (generate, openai, admin_prefixes, admin_tenants, admin_quotas, health):
        app.include_router(module.router)
    return app


async def start_services(
    settings: Settings,
    metrics: Metrics,
    loaded: ModelInfo | None = None,
    engine: Engine | EngineBackend | None = None,
) -> Services:
    if loaded is None:
        loaded = await asyncio.to_thread(
            load_model, settings.model, dtype=settings.dtype, device=settings.device
        )
    store, resolver = await open_registry(settings, loaded.fingerprint)
    if engine is None:
        assert isinstance(loaded, LoadedModel)  # only a ModelSummary comes with a backend
        engine = Engine(loaded, engine_config(settings))
    backend = LocalBackend(engine) if isinstance(engine, Engine) else engine
    backend.start()
    keys = KeyCache(store.tenant_for_key_hash, ttl_s=settings.auth_cache_ttl_s)
    quotas = QuotaCache(store, Quota.defaults(settings), settings.tenant_quota_ttl_s)

    def reset() -> None:  # announcements may have been missed: read everything again
        keys.expire_all()
        quotas.expire_all()

    await store.subscribe(on_reset=reset, on_revoked=keys.revoke, on_quota=quotas.expire)
    auth = Authenticator(
        admin_key=settings.admin_key.get_secret_value() if settings.admin_key else None,
        disabled=settings.auth_disabled, lookup=keys.tenant_for,
    )
    metrics.watch_engine(backend.stats, known=quotas.__contains__)
    prompts = PromptEncoder(loaded.tokenizer, settings.max_seq_len or loaded.max_context,
                            settings.tokenizer_threads)
    services = Services(settings, loaded, backend, store, resolver, auth, metrics,
                        Lifecycle(backend, settings.shutdown_grace_s), quotas,
                        rate_limiter_for(store),
                        prompts,
                        engine=engine if isinstance(engine, Engine) else None)
    if settings.auth_disabled:
        await _development_mode(store)
    _log_startup(services)
    return services


async def open_registry(
    settings: Settings, fingerprint: ModelFingerprint
) -> tuple[PrefixStore, PrefixResolver]:
    """The prefix store and the resolver in front of it, subscribed to its changes."""
    store = open_store(
        settings.redis_url, namespace=_namespace(settings), directory=settings.data_dir,
        limits=Limits(max_upload_bytes=settings.max_upload_bytes),
        max_connections=settings.redis_max_connections,
        pool_timeout_s=settings.redis_pool_timeout_s,
    )
    resolver = PrefixResolver(store, fingerprint=fingerprint,
                              max_bytes=settings.prefix_cache_bytes)
    await resolver.start()
    return store, resolver


async def stop_services(services: Services) -> None:
    try:
        await services.lifecycle.wait_drained()
    finally:
        services.prompts.close()
        await services.resolver.close()
        await services.store.close()
    log.info("stopped")


def engine_config(settings: Settings) -> EngineConfig:
    return EngineConfig(
        max_batch_size=settings.max_batch_size,
        max_queue=settings.max_queue,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        block_size=settings.block_size,
        admission_lookahead_tokens=settings.admission_lookahead_tokens,
        kv_cache_bytes=settings.kv_cache_bytes,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        cpu_kv_fraction=settings.cpu_kv_fraction,
        max_seq_len=settings.max_seq_len,
        attention_backend=settings.attention_backend,
        output_thread=settings.output_thread,
        fairness=settings.fairness,
        fair_prompt_weight=settings.fair_prompt_weight,
        fair_output_weight=settings.fair_output_weight,
    )


def _metrics_listener(settings: Settings, metrics: Metrics) -> MetricsListener | None:
    """`--metrics-port`: /metrics without a key, on its own listener (loopback by default), for
    a Prometheus beside the server; the main port's /metrics needs the operator key."""
    if settings.metrics_port is None:
        return None
    listener = serve_metrics(metrics, settings.metrics_host, settings.metrics_port)
    log.info("metrics on http://%s:%d/metrics (no key)", settings.metrics_host, listener.port)
    return listener


def _namespace(settings: Settings) -> str:
    return settings.namespace if settings.namespace.endswith(":") else settings.namespace + ":"


async def _development_mode(store: PrefixStore) -> None:
    log.warning(
        "AUTHENTICATION IS DISABLED (--auth-disabled): every caller is tenant %r with operator "
        "rights. Never expose this server beyond your machine.", DEFAULT_TENANT,
    )
    try:
        if not await store.tenant_exists(DEFAULT_TENANT):
            await store.create_tenant(DEFAULT_TENANT)
    except reg.ConflictError:
        pass  # another process created it meanwhile
    except reg.RegistryUnavailableError as exc:
        log.warning("could not create tenant %r yet: %s", DEFAULT_TENANT, exc.message)


def _log_startup(services: Services) -> None:
    loaded, settings = services.loaded, services.settings
    log.info(
        "model %s loaded: family=%s dtype=%s device=%s max_context=%d fingerprint=%s (%s)",
        loaded.name, loaded.family.name, str(loaded.dtype).removeprefix("torch."),
        loaded.device, loaded.max_context, loaded.fingerprint.digest[:16],
        loaded.fingerprint.short,
    )
    log.info("registry: %s", settings.store_description)
    log.info("engine: %s", services.backend.stats() or type(services.backend).__name__)
