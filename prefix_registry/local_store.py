"""The embedded prefix store: a directory on disk, the default when no Redis URL is set.

Same protocol and guarantees as the Redis store within one machine: versions are allocated under
a file lock (so several processes may share the directory), files are written atomically, and a
version number is never reused. Change callbacks reach subscribers in this process only; other
processes sharing the directory are not notified (use Redis for several server processes).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import TypeVar

from prefix_registry.artifact import PrefixArtifact, PrefixMeta
from prefix_registry.errors import (
    ApiKeyNotFoundError,
    ConflictError,
    CorruptRecordError,
    PrefixNotFoundError,
    RegistryUnavailableError,
    TenantNotFoundError,
    excerpt,
)
from prefix_registry.local_files import LocalFiles, remove_orphans
from prefix_registry.quotas import (
    QuotaValue,
    StorageLimits,
    TenantQuota,
    TenantUsage,
    check_quota_changes,
)
from prefix_registry.records import artifact_record, checked_meta, skip_corrupt
from prefix_registry.store import (
    DEFAULT_PAGE_SIZE,
    ApiKeyInfo,
    InvalidationCallback,
    KeyList,
    MetaList,
    Notifier,
    Page,
    QuotaCallback,
    ResetCallback,
    RevokedCallback,
    Subscription,
    TenantDeletion,
    TenantInfo,
    TenantList,
    clamp_limit,
)
from prefix_registry.validation import (
    KEY_HASH_RE,
    NAME_RE,
    Limits,
    parse_ref,
    validate_key_hash,
    validate_name,
)

T = TypeVar("T")
log = logging.getLogger(__name__)


class LocalStore:
    """PrefixStore in a local directory (created on first write)."""

    def __init__(self, directory: str | Path, *, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.directory = Path(directory)
        self._files = LocalFiles(self.directory)
        self._notifier = Notifier()

    async def _io(self, fn: Callable[..., T], *args: object) -> T:
        """Run blocking file work in a thread; disk failures become RegistryUnavailableError."""
        try:
            return await asyncio.to_thread(fn, *args)
        except OSError as e:
            raise RegistryUnavailableError(f"prefix registry directory failed: {e}") from e

    # ---- prefixes -------------------------------------------------------------------------

    async def put(
        self, artifact: PrefixArtifact, *, limits: StorageLimits | None = None
    ) -> PrefixMeta:
        await asyncio.to_thread(artifact.validate, self.limits)
        tenant, name = artifact.meta.tenant, artifact.meta.name
        if not await self.tenant_exists(tenant):
            raise TenantNotFoundError(f"tenant {excerpt(tenant)} does not exist")
        if limits is None or limits.unlimited:
            stored = await self._io(self._write, artifact)
        else:
            stored = await self._io(self._write_within, artifact, limits)
        await self._notifier.changed(tenant, name)
        return stored

    def _write(self, artifact: PrefixArtifact) -> PrefixMeta:
        """Allocate the next version and write it, unless the newest version is this very upload
        (a retry): then that version (blocking)."""
        tenant, name = artifact.meta.tenant, artifact.meta.name
        with self._files.name_lock(tenant, name):
            same = self._newest_if_same(artifact.meta)
            if same is not None:
                return same
            version = self._files.next_version(tenant, name)
            stored = artifact.stored_as(version, time.time())
            self._files.write_version(tenant, name, version, stored.to_bytes())
        return stored.meta

    def _newest_if_same(self, meta: PrefixMeta) -> PrefixMeta | None:
        """The newest stored version when it has `meta`'s upload digest (blocking)."""
        numbers = self._files.version_numbers(meta.tenant, meta.name)
        if not numbers:
            return None
        newest = skip_corrupt(partial(self._checked_meta, meta.tenant, meta.name, numbers[-1]))
        return newest if newest is not None and newest.upload_digest == meta.upload_digest \
            else None

    def _write_within(self, artifact: PrefixArtifact, limits: StorageLimits) -> PrefixMeta:
        """`_write` under the tenant's lock, if the tenant stays within `limits` (blocking)."""
        tenant, name = artifact.meta.tenant, artifact.meta.name
        with self._files.tenant_lock(tenant):
            same = self._newest_if_same(artifact.meta)  # a retry takes no room: not checked
            if same is not None:
                return same
            new_name = not self._files.version_numbers(tenant, name)
            usage = self._files.usage(tenant)
            limits.check(tenant, usage, new_name=new_name, size=artifact.meta.size_bytes)
            return self._write(artifact)

    async def get(self, tenant: str, ref: str) -> PrefixArtifact:
        """The artifact, checked like an upload (records.py): a bad file is a
        CorruptRecordError."""
        artifact: PrefixArtifact = await self._resolve(tenant, ref, self._checked_artifact)
        return artifact

    async def get_meta(self, tenant: str, ref: str) -> PrefixMeta:
        meta: PrefixMeta = await self._resolve(tenant, ref, self._checked_meta)
        return meta

    def _checked_artifact(self, tenant: str, name: str, version: int) -> PrefixArtifact | None:
        blob = self._files.read_blob(tenant, name, version)
        if blob is None:
            return None
        return artifact_record(blob, key=self._files.version_key(tenant, name, version),
                               tenant=tenant, name=name, version=version, limits=self.limits)

    def _checked_meta(self, tenant: str, name: str, version: int) -> PrefixMeta | None:
        meta = self._files.read_meta(tenant, name, version)
        if meta is None:
            return None
        return checked_meta(meta, key=self._files.version_key(tenant, name, version),
                            tenant=tenant, name=name, version=version, limits=self.limits)

    async def exists(self, tenant: str, ref: str) -> bool:
        validate_name(tenant, "tenant name")
        name, version = parse_ref(ref)
        found = await self._io(self._files.version_numbers, tenant, name)
        return bool(found) if version is None else version in found

    async def list(
        self, tenant: str, *, limit: int = DEFAULT_PAGE_SIZE, cursor: str | None = None
    ) -> Page:
        validate_name(tenant, "tenant name")
        limit = clamp_limit(limit)
        if cursor is not None:
            validate_name(cursor, "cursor")
        if not await self.tenant_exists(tenant):
            raise TenantNotFoundError(f"tenant {excerpt(tenant)} does not exist")
        items = await self._io(self._page, tenant, limit + 1, cursor)
        more = len(items) > limit
        return Page(items=items[:limit], next_cursor=items[limit - 1].name if more else None)

    def _page(self, tenant: str, count: int, cursor: str | None) -> MetaList:
        """Up to `count` latest metas of names after `cursor` (blocking)."""
        items: MetaList = []
        for name in self._files.names(tenant):
            if len(items) == count:
                break
            if cursor is not None and name <= cursor:
                continue
            found = self._files.version_numbers(tenant, name)
            read = partial(self._checked_meta, tenant, name, found[-1]) if found else None
            meta = skip_corrupt(read) if read is not None else None  # a bad one is left out
            if meta is not None:
                items.append(meta)
        return items

    async def versions(self, tenant: str, name: str) -> MetaList:
        validate_name(tenant, "tenant name")
        validate_name(name)
        numbers = await self._io(self._files.version_numbers, tenant, name)
        read = [partial(self._checked_meta, tenant, name, v) for v in numbers]
        metas = [await self._io(skip_corrupt, r) for r in read]  # a bad version is left out
        found = [m for m in metas if m is not None]
        if not found and numbers:  # every version is bad: say so, rather than "not found"
            raise CorruptRecordError(f"every stored version of {name!r} is corrupt (logged)",
                                     self._files.version_key(tenant, name, numbers[-1]))
        if not found:
            raise PrefixNotFoundError(f"prefix {name!r} not found")
        return found

    async def delete(self, tenant: str, name: str, version: int | None = None) -> int:
        validate_name(tenant, "tenant name")
        validate_name(name)
        count = await self._io(self._files.delete, tenant, name, version)
        if count == 0:
            what = name if version is None else f"{name}@{version}"
            raise PrefixNotFoundError(f"prefix {excerpt(what)} not found")
        await self._notifier.changed(tenant, name)
        return count

    async def _resolve(self, tenant: str, ref: str, fetch: Callable[..., T | None]) -> T:
        """`fetch(tenant, name, version)` for `ref`; `name` means the newest version."""
        validate_name(tenant, "tenant name")
        name, version = parse_ref(ref)
        for _ in range(3):  # re-resolve if the newest version is deleted meanwhile
            numbers = await self._io(self._files.version_numbers, tenant, name)
            v = version if version is not None else (numbers[-1] if numbers else None)
            found = None if v is None else await self._io(fetch, tenant, name, v)
            if found is not None:
                return found
            if v is None or version is not None:
                break
        raise PrefixNotFoundError(f"prefix {excerpt(ref)} not found")

    # ---- invalidation ---------------------------------------------------------------------

    async def subscribe(
        self, callback: InvalidationCallback | None = None, *,
        on_reset: ResetCallback | None = None, on_revoked: RevokedCallback | None = None,
        on_quota: QuotaCallback | None = None,
    ) -> Subscription:
        return self._notifier.add(callback, on_reset, on_revoked, on_quota)

    # ---- tenants and API keys -------------------------------------------------------------

    async def create_tenant(self, name: str) -> TenantInfo:
        validate_name(name, "tenant name")
        created_at = time.time()
        if not await self._io(self._files.create_tenant, name, created_at):
            raise ConflictError(f"tenant {excerpt(name)} already exists")
        return TenantInfo(name=name, created_at=created_at)

    async def list_tenants(self) -> TenantList:
        names = await self._io(self._files.tenant_names)
        found = [(n, await self._io(skip_corrupt, partial(self._files.tenant_created_at, n)))
                 for n in names]  # a corrupt record is logged and left out
        return [TenantInfo(n, at) for n, at in found if at is not None]

    async def tenant_exists(self, name: str) -> bool:
        if not NAME_RE.match(name):  # it is a directory name here
            return False
        return await self._io(self._files.tenant_known, name)

    async def add_key(
        self, tenant: str, key_id: str, key_hash: str, created_at: float
    ) -> ApiKeyInfo:
        validate_name(key_id, "key id")
        validate_key_hash(key_hash)
        if not await self.tenant_exists(tenant):
            raise TenantNotFoundError(f"tenant {excerpt(tenant)} does not exist")
        code = await self._io(self._files.add_key, tenant, key_id, key_hash, created_at)
        if code in (-2, -3):
            what = f"key id {excerpt(key_id)}" if code == -2 else "this key hash"
            raise ConflictError(f"{what} already exists")
        return ApiKeyInfo(key_id=key_id, created_at=created_at)

    async def list_keys(self, tenant: str) -> KeyList:
        if not await self.tenant_exists(tenant):
            raise TenantNotFoundError(f"tenant {excerpt(tenant)} does not exist")
        keys = await self._io(self._files.keys, tenant)
        infos = [ApiKeyInfo(key_id, created_at) for key_id, created_at in keys]
        return sorted(infos, key=lambda key: (key.created_at, key.key_id))

    async def revoke_key(self, tenant: str, key_id: str) -> None:
        validate_name(tenant, "tenant name")
        valid = NAME_RE.match(key_id) is not None  # an id that can't exist is simply unknown
        key_hash = await self._io(self._files.revoke_key, tenant, key_id) if valid else None
        if key_hash is None:
            raise ApiKeyNotFoundError(f"tenant {excerpt(tenant)} has no key {excerpt(key_id)}")
        if key_hash:  # "": its record was corrupt and no key-hash record named it
            await self._notifier.revoked([key_hash])

    async def delete_tenant(self, name: str) -> TenantDeletion:
        validate_name(name, "tenant name")
        found = await self._io(self._files.delete_tenant, name)
        if found is None:
            raise TenantNotFoundError(f"tenant {excerpt(name)} does not exist")
        hashes, prefixes = found
        await self._notifier.revoked(hashes)
        for prefix in prefixes:
            await self._notifier.changed(name, prefix)
        return TenantDeletion(keys=len(hashes), prefixes=sum(prefixes.values()))

    async def tenant_for_key_hash(self, key_hash: str) -> str | None:
        if not KEY_HASH_RE.match(key_hash):  # it is a file name here
            return None
        return await self._io(self._files.tenant_for_key_hash, key_hash)

    # ---- quotas ---------------------------------------------------------------------------

    async def get_quota(self, tenant: str) -> TenantQuota:
        await self._known(tenant)
        return TenantQuota.from_dict(await self._io(self._files.read_quota, tenant))

    async def update_quota(
        self, tenant: str, changes: Mapping[str, QuotaValue | None]
    ) -> TenantQuota:
        checked = check_quota_changes(changes)
        await self._known(tenant)
        quota = await self._io(self._update_quota, tenant, checked)
        await self._notifier.quota_changed(tenant)
        return quota

    def _update_quota(self, tenant: str, changes: Mapping[str, QuotaValue | None]
                      ) -> TenantQuota:
        with self._files.tenant_lock(tenant):
            quota = TenantQuota.from_dict(self._files.read_quota(tenant)).updated(changes)
            self._files.write_quota(tenant, quota.to_dict())
        return quota

    async def usage(self, tenant: str) -> TenantUsage:
        await self._known(tenant)
        return await self._io(self._files.usage, tenant)

    async def _known(self, tenant: str) -> None:
        if not await self.tenant_exists(tenant):
            raise TenantNotFoundError(f"tenant {excerpt(tenant)} does not exist")

    # ---- lifecycle ------------------------------------------------------------------------

    def remove_orphans(self) -> int:
        """Delete temporary files that a killed process left mid-write (blocking; at start)."""
        removed = remove_orphans(self.directory) if self.directory.exists() else 0
        if removed:
            log.warning("removed %d temporary file(s) left by an interrupted write in %s",
                        removed, self.directory)
        return removed

    async def ping(self) -> None:
        await self._io(self.directory.mkdir, 0o755, True, True)  # parents, exist_ok

    async def close(self) -> None:
        return None
