"""Verified tenant API keys, cached in memory by their hash, so auth survives registry trouble.

A key the registry confirmed is trusted for `ttl_s`; after that the next request asks the
registry again. Revocations and tenant deletions reach every server at once over the registry's
pub/sub (`revoke`), and the TTL bounds how long a revoked key can still work while pub/sub is
down. When the registry cannot be reached, a key verified before keeps working (stale-if-error):
a revocation needs the registry too, so none can have been written meanwhile, except by a server
on the far side of a network split, which the TTL cannot bound either. Unknown keys are never
cached, and concurrent lookups of one hash share one registry call (a cold burst makes one).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass

from prefix_registry.errors import RegistryUnavailableError
from server.api.auth import KeyLookup

DEFAULT_MAX_ENTRIES = 100_000


@dataclass
class _Entry:
    tenant: str
    verified_at: float  # time.monotonic() of the registry's last answer


class KeyCache:
    def __init__(
        self, lookup: KeyLookup, *, ttl_s: float, max_entries: int = DEFAULT_MAX_ENTRIES
    ) -> None:
        self._lookup = lookup
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # LRU: oldest use first
        self._inflight: dict[str, asyncio.Future[str | None]] = {}
        self._generation = 0  # bumped by every revocation; guards lookups in flight

    async def tenant_for(self, key_hash: str) -> str | None:
        """The tenant owning this key hash, or None for an unknown key. Raises
        RegistryUnavailableError only for a key never verified (or revoked) before."""
        entry = self._entries.get(key_hash)
        if entry is not None:
            self._entries.move_to_end(key_hash)
            if time.monotonic() - entry.verified_at < self._ttl_s:
                return entry.tenant
        try:
            return await self._verify(key_hash)
        except RegistryUnavailableError:
            if entry is not None and key_hash in self._entries:
                return entry.tenant  # stale-if-error: see the module docstring
            raise

    async def _verify(self, key_hash: str) -> str | None:
        pending = self._inflight.get(key_hash)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._inflight[key_hash] = future
        generation = self._generation
        try:
            tenant = await self._lookup(key_hash)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, nobody else must
            raise
        finally:
            del self._inflight[key_hash]
        future.set_result(tenant)
        if generation == self._generation:
            self._store(key_hash, tenant)
        return tenant

    def _store(self, key_hash: str, tenant: str | None) -> None:
        if tenant is None:
            self._entries.pop(key_hash, None)
            return
        self._entries[key_hash] = _Entry(tenant, time.monotonic())
        self._entries.move_to_end(key_hash)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def revoke(self, key_hashes: list[str]) -> None:
        """These keys stop working now (a revocation or a tenant deletion, from any server)."""
        self._generation += 1
        for key_hash in key_hashes:
            self._entries.pop(key_hash, None)

    def expire_all(self) -> None:
        """Verify every key again on its next use (announcements may have been missed), while
        still honouring stale-if-error."""
        self._generation += 1
        for entry in self._entries.values():
            entry.verified_at = float("-inf")

    def __len__(self) -> int:
        return len(self._entries)
