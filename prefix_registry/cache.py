"""An in-process cache of artifacts in front of a store, kept fresh by its change announcements.

Entries are keyed by (tenant, ref) as the caller asked (`name` or `name@N`); a change to
(tenant, name) from any process drops every entry of that name, and a listener reconnect (changes
possibly missed) drops everything. A fetch that raced with an invalidation is not cached.
Concurrent misses of one (tenant, ref) share one fetch: a cold burst reads a prefix once, not once
per request.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from prefix_registry.artifact import PrefixArtifact
from prefix_registry.store import PrefixStore, Subscription
from prefix_registry.validation import parse_ref

DEFAULT_MAX_BYTES = 512 * 2**20


class CachedStore:
    """`get` through an LRU bounded by tensor bytes; everything else goes to `store` directly."""

    def __init__(self, store: PrefixStore, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.store = store
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, str], PrefixArtifact] = OrderedDict()
        self._bytes = 0
        self._generation = 0  # bumped by every invalidation; guards fetches in flight
        self._subscription: Subscription | None = None
        self._inflight: dict[tuple[str, str, int], asyncio.Future[PrefixArtifact]] = {}

    def __contains__(self, key: object) -> bool:
        """Whether `(tenant, ref)` is cached now (a `get` of it would not reach the store)."""
        return key in self._entries

    async def start(self) -> None:
        """Subscribe to the store's changes (call once, inside the event loop)."""
        if self._subscription is None:
            self._subscription = await self.store.subscribe(self.invalidate, on_reset=self.clear)

    async def close(self) -> None:
        if self._subscription is not None:
            self._subscription.close()
            self._subscription = None
        self.clear()

    async def get(self, tenant: str, ref: str) -> PrefixArtifact:
        key = (tenant, ref)
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        generation = self._generation
        flight = (tenant, ref, generation)  # after an invalidation, a fresh fetch
        pending = self._inflight.get(flight)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[PrefixArtifact] = asyncio.get_running_loop().create_future()
        self._inflight[flight] = future
        try:
            artifact = await self.store.get(tenant, ref)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: the waiters re-raise it
            raise
        finally:
            del self._inflight[flight]
        future.set_result(artifact)
        if generation == self._generation and self._subscription is not None:
            self._insert(key, artifact)
        return artifact

    def _insert(self, key: tuple[str, str], artifact: PrefixArtifact) -> None:
        size = artifact.meta.size_bytes
        if size > self.max_bytes:
            return
        self._drop(key)
        self._entries[key] = artifact
        self._bytes += size
        while self._bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: tuple[str, str]) -> None:
        artifact = self._entries.pop(key, None)
        if artifact is not None:
            self._bytes -= artifact.meta.size_bytes

    def invalidate(self, tenant: str, name: str) -> None:
        """Forget every cached version of (tenant, name)."""
        self._generation += 1
        for key in [k for k in self._entries if k[0] == tenant and parse_ref(k[1])[0] == name]:
            self._drop(key)

    def clear(self) -> None:
        self._generation += 1
        self._entries.clear()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)
