"""The prefix store protocol, shared by the Redis backend and the embedded local directory.

A prefix is addressed by (tenant, ref) where ref is `name` (the latest version) or `name@N`
(a fixed version). Versions are immutable, numbered 1, 2, ... per (tenant, name), and a number is
never reused, even after deletes. Every change (put, delete) is announced to subscribers as
`callback(tenant, name)`; every API key that stops working (revoked, or its tenant deleted) as
`on_revoked([key_hash, ...])`; `on_reset()` means "changes may have been missed: drop everything".
"""

from __future__ import annotations

import inspect
import itertools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from prefix_registry.artifact import PrefixArtifact, PrefixMeta
from prefix_registry.quotas import QuotaValue, StorageLimits, TenantQuota, TenantUsage
from prefix_registry.validation import Limits

log = logging.getLogger(__name__)

DEFAULT_NAMESPACE = "prefix-serve:"
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000

InvalidationCallback = Callable[[str, str], object]  # (tenant, name); may return an awaitable
ResetCallback = Callable[[], object]  # may return an awaitable
RevokedCallback = Callable[[list[str]], object]  # key hashes; may return an awaitable
QuotaCallback = Callable[[str], object]  # tenant whose quota changed; may return an awaitable
MetaList = list[PrefixMeta]  # aliases: inside the store classes `list` is a method


@dataclass(frozen=True)
class Page:
    items: MetaList  # the latest version of each name, ordered by name
    next_cursor: str | None  # pass back as `cursor` for the next page; None on the last page


@dataclass(frozen=True)
class TenantInfo:
    name: str
    created_at: float  # unix time


@dataclass(frozen=True)
class TenantDeletion:
    """What deleting a tenant removed."""

    keys: int  # API keys revoked
    prefixes: int  # prefix versions deleted


@dataclass(frozen=True)
class ApiKeyInfo:
    key_id: str
    created_at: float  # unix time; the key itself is never stored, only its hash


TenantList = list[TenantInfo]
KeyList = list[ApiKeyInfo]


def clamp_limit(limit: int) -> int:
    return max(1, min(int(limit), MAX_PAGE_SIZE))


@dataclass(frozen=True)
class _Sub:
    changed: InvalidationCallback | None
    reset: ResetCallback | None
    revoked: RevokedCallback | None
    quota: QuotaCallback | None = None


class Subscription:
    """A registered set of callbacks; `close()` unregisters them."""

    def __init__(self, notifier: Notifier, sub_id: int) -> None:
        self._notifier = notifier
        self._id = sub_id

    def close(self) -> None:
        self._notifier.remove(self._id)


class Notifier:
    """Fans change announcements out to in-process subscribers; a failing callback is logged."""

    def __init__(self) -> None:
        self._subs: dict[int, _Sub] = {}
        self._ids = itertools.count(1)

    def add(
        self, callback: InvalidationCallback | None, on_reset: ResetCallback | None,
        on_revoked: RevokedCallback | None = None, on_quota: QuotaCallback | None = None,
    ) -> Subscription:
        sub_id = next(self._ids)
        self._subs[sub_id] = _Sub(callback, on_reset, on_revoked, on_quota)
        return Subscription(self, sub_id)

    def remove(self, sub_id: int) -> None:
        self._subs.pop(sub_id, None)

    async def changed(self, tenant: str, name: str) -> None:
        for sub in list(self._subs.values()):
            if sub.changed is not None:
                await _call(sub.changed, tenant, name)

    async def revoked(self, key_hashes: list[str]) -> None:
        for sub in list(self._subs.values()):
            if sub.revoked is not None and key_hashes:
                await _call(sub.revoked, list(key_hashes))

    async def quota_changed(self, tenant: str) -> None:
        for sub in list(self._subs.values()):
            if sub.quota is not None:
                await _call(sub.quota, tenant)

    async def reset(self) -> None:
        for sub in list(self._subs.values()):
            if sub.reset is not None:
                await _call(sub.reset)


async def _call(fn: Callable[..., object], *args: object) -> None:
    try:
        result = fn(*args)
        if inspect.isawaitable(result):
            await result
    except Exception:  # a subscriber's bug must not break the store
        log.exception("prefix change callback failed")


class PrefixStore(Protocol):
    """Where prefixes, tenants and API key hashes live. Every method may raise
    RegistryUnavailableError when the backend can't be reached, and CorruptRecordError when a
    record it read fails the checks of `records.py` (listings leave such a record out)."""

    limits: Limits

    async def put(
        self, artifact: PrefixArtifact, *, limits: StorageLimits | None = None
    ) -> PrefixMeta:
        """Validate and store `artifact` as a new version of (meta.tenant, meta.name).

        Returns the stored metadata (version and created_at assigned). When the newest version
        of the name has the same `upload_digest` (a retried upload), nothing is stored and that
        version's metadata is returned, so a retry after a failed acknowledgement makes no
        duplicate. Raises TenantNotFoundError, InvalidPrefixError, PrefixTooLargeError, and
        QuotaExceededError when the tenant would go past `limits` (checked atomically with the
        write, so concurrent uploads cannot overshoot).
        """
        ...

    async def get(self, tenant: str, ref: str) -> PrefixArtifact:
        """The artifact `ref` (`name` = latest, `name@N`); PrefixNotFoundError if absent."""
        ...

    async def get_meta(self, tenant: str, ref: str) -> PrefixMeta:
        """Like `get` without loading the tensors."""
        ...

    async def list(
        self, tenant: str, *, limit: int = DEFAULT_PAGE_SIZE, cursor: str | None = None
    ) -> Page:
        """One page of a tenant's prefixes (latest versions, by name); TenantNotFoundError."""
        ...

    async def versions(self, tenant: str, name: str) -> MetaList:
        """Every stored version of `name`, oldest first; PrefixNotFoundError if none."""
        ...

    async def delete(self, tenant: str, name: str, version: int | None = None) -> int:
        """Delete one version or (version=None) all; returns how many; PrefixNotFoundError if 0."""
        ...

    async def exists(self, tenant: str, ref: str) -> bool: ...

    async def subscribe(
        self, callback: InvalidationCallback | None = None, *,
        on_reset: ResetCallback | None = None, on_revoked: RevokedCallback | None = None,
        on_quota: QuotaCallback | None = None,
    ) -> Subscription:
        """Call `callback(tenant, name)` after every change by any process sharing the store,
        `on_revoked(key_hashes)` when keys stop working and `on_quota(tenant)` when a tenant's
        quota changed. Each is optional: a subscriber names only what it listens for."""
        ...

    async def create_tenant(self, name: str) -> TenantInfo:
        """Create a tenant; ConflictError if it exists."""
        ...

    async def list_tenants(self) -> TenantList: ...

    async def delete_tenant(self, name: str) -> TenantDeletion:
        """Delete a tenant: its keys stop working at once (announced to `on_revoked`), then its
        prefixes are deleted (announced to `callback`); TenantNotFoundError. Creating a tenant
        of the same name later starts empty."""
        ...

    async def tenant_exists(self, name: str) -> bool: ...

    async def add_key(
        self, tenant: str, key_id: str, key_hash: str, created_at: float
    ) -> ApiKeyInfo:
        """Store an API key's hash; TenantNotFoundError, ConflictError (id or hash taken)."""
        ...

    async def list_keys(self, tenant: str) -> KeyList: ...

    async def revoke_key(self, tenant: str, key_id: str) -> None:
        """Forget a key (announced to `on_revoked`); ApiKeyNotFoundError if the tenant has no
        such key."""
        ...

    async def tenant_for_key_hash(self, key_hash: str) -> str | None:
        """The tenant owning the key with this hash (O(1)), or None."""
        ...

    async def get_quota(self, tenant: str) -> TenantQuota:
        """The quota fields the operator set for `tenant`; TenantNotFoundError."""
        ...

    async def update_quota(
        self, tenant: str, changes: Mapping[str, QuotaValue | None]
    ) -> TenantQuota:
        """Set (value) or clear (None) quota fields atomically; returns the new quota.
        TenantNotFoundError, InvalidQuotaError."""
        ...

    async def usage(self, tenant: str) -> TenantUsage:
        """What `tenant` stores: prefix names and bytes; TenantNotFoundError."""
        ...

    async def ping(self) -> None:
        """Raise RegistryUnavailableError unless the backend answers."""
        ...

    async def close(self) -> None: ...
