"""`open_store`: the backend a deployment asked for, behind the PrefixStore protocol.

Its own module because it names both backends, which themselves import the protocol (store.py):
beside the protocol it would make a circle.
"""

from __future__ import annotations

from pathlib import Path

from prefix_registry.local_store import LocalStore
from prefix_registry.redis_connect import RedisOptions
from prefix_registry.redis_store import RedisStore
from prefix_registry.store import DEFAULT_NAMESPACE, PrefixStore
from prefix_registry.validation import Limits


def open_store(
    redis_url: str | None,
    *,
    namespace: str = DEFAULT_NAMESPACE,
    directory: str | Path,
    limits: Limits | None = None,
    max_connections: int = 100,
    pool_timeout_s: float = 5.0,
) -> PrefixStore:
    """A RedisStore when `redis_url` is set (a pool of at most `max_connections`, where a caller
    waits up to `pool_timeout_s` for a free one), else a LocalStore in `directory` (whose
    temporary files orphaned by a crash are removed now)."""
    if redis_url:
        options = RedisOptions(max_connections=max_connections, pool_timeout_s=pool_timeout_s)
        return RedisStore(redis_url, namespace=namespace, limits=limits, options=options)
    store = LocalStore(directory, limits=limits)
    store.remove_orphans()
    return store
