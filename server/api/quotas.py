"""Each tenant's quota as the server applies it: the operator's fields over the server's defaults,
cached in memory so that a request needs no registry round trip.

A tenant's quota is read from the registry at most once per `--tenant-quota-ttl-s`, shared by the
requests that ask meanwhile; a change made through this server applies at once, one made through
another server as soon as the registry's announcement arrives (pub/sub), and within the TTL if it
never does. While the registry is unreachable the last known quota is used. A stored quota that
is corrupt (a field that is not JSON or not valid, a record of the wrong type) counts as no
override for what is bad: the server's defaults apply there, and the bad key is logged.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

from prefix_registry.errors import RegistryError, RegistryUnavailableError, TenantNotFoundError
from prefix_registry.quotas import StorageLimits, TenantQuota
from prefix_registry.store import PrefixStore
from server.engine.request import TenantShare
from server.settings import Settings

log = logging.getLogger("prefix_serve.quotas")


@dataclass(frozen=True)
class Quota:
    """A tenant's effective quota; None = no limit."""

    weight: float = 1.0
    max_running: int | None = None
    max_queued: int | None = None
    tokens_per_minute: int | None = None
    max_prefixes: int | None = None
    max_stored_bytes: int | None = None

    @classmethod
    def defaults(cls, settings: Settings) -> Quota:
        return cls(
            weight=settings.tenant_weight, max_running=settings.tenant_max_running,
            max_queued=settings.tenant_max_queued,
            tokens_per_minute=settings.tenant_tokens_per_minute,
            max_prefixes=settings.tenant_max_prefixes,
            max_stored_bytes=settings.tenant_max_stored_bytes,
        )

    def over(self, overrides: TenantQuota) -> Quota:
        """These defaults with the fields the operator set."""
        changes: dict[str, Any] = overrides.to_dict()
        return replace(self, **changes)

    def share(self, tenant: str) -> TenantShare:
        """What the engine needs: the fair-share weight and the running / queued caps."""
        return TenantShare(tenant, self.weight, self.max_running, self.max_queued)

    def storage_limits(self) -> StorageLimits:
        return StorageLimits(self.max_prefixes, self.max_stored_bytes)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class QuotaCache:
    """tenant -> effective `Quota`, read through from the registry (module docstring)."""

    def __init__(self, store: PrefixStore, defaults: Quota, ttl_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.defaults = defaults
        self._store = store
        self._ttl_s = ttl_s
        self._clock = clock
        self._entries: dict[str, tuple[float, Quota]] = {}  # tenant -> (read at, quota)
        self._generation = 0  # bumped by every expiry: a read in flight may predate it
        self._reads: dict[str, asyncio.Future[Quota]] = {}  # reads in flight, shared

    async def get(self, tenant: str) -> Quota:
        """`tenant`'s quota; TenantNotFoundError, or RegistryUnavailableError when the registry
        is down and the tenant was never read."""
        entry = self._entries.get(tenant)
        if entry is not None and self._clock() - entry[0] < self._ttl_s:
            return entry[1]
        try:
            return await asyncio.shield(self._read(tenant))
        except RegistryUnavailableError:
            if entry is not None:
                return entry[1]  # a stale quota beats failing while the registry is down
            raise

    def remember(self, tenant: str, overrides: TenantQuota) -> Quota:
        """Use `overrides` (just written by this server) from now on."""
        quota = self.defaults.over(overrides)
        self._entries[tenant] = (self._clock(), quota)
        return quota

    def invalidate(self, tenant: str) -> None:
        """Forget `tenant` (deleted)."""
        self._generation += 1
        self._entries.pop(tenant, None)

    def expire(self, tenant: str) -> None:
        """Read `tenant`'s quota again on its next request (it changed elsewhere); until then,
        and while the registry is down, the last one is kept."""
        self._generation += 1
        if tenant in self._entries:
            self._entries[tenant] = (-math.inf, self._entries[tenant][1])

    def expire_all(self) -> None:
        """Read every quota again (changes may have been missed)."""
        self._generation += 1
        self._entries = {tenant: (-math.inf, quota) for tenant, (_, quota) in
                         self._entries.items()}

    def __contains__(self, tenant: object) -> bool:
        """Whether `tenant` was read (and existed) since the server started."""
        return tenant in self._entries

    def _read(self, tenant: str) -> asyncio.Future[Quota]:
        read = self._reads.get(tenant)
        if read is None:
            read = asyncio.ensure_future(self._fetch(tenant))
            self._reads[tenant] = read
            read.add_done_callback(lambda done: self._read_done(tenant, done))
        return read

    def _read_done(self, tenant: str, read: asyncio.Future[Quota]) -> None:
        self._reads.pop(tenant, None)
        if not read.cancelled():
            read.exception()  # marks it retrieved: the callers that awaited it may be gone

    async def _fetch(self, tenant: str) -> Quota:
        generation = self._generation
        try:
            overrides = await self._store.get_quota(tenant)
        except TenantNotFoundError:
            self._entries.pop(tenant, None)
            raise
        except RegistryUnavailableError:
            raise
        except RegistryError as exc:  # a corrupt record (say, of the wrong Redis type)
            log.warning("tenant %r: using the default quota: %s", tenant, exc)
            overrides = TenantQuota()
        quota = self.defaults.over(overrides)
        # A change announced while this read was in flight may not be in it: use it, read again.
        fresh = generation == self._generation
        self._entries[tenant] = (self._clock() if fresh else -math.inf, quota)
        return quota
