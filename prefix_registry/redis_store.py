"""The production prefix store: Redis through redis-py's asyncio client.

Every key lives under one namespace (layout in `redis_keys.py` and docs/registry.md). Versions
come from a per-name counter (INCR) that is never reset, so a number is never reused; a version's
blob, metadata, the version index and the tenant's name index are written by one Lua script,
which also publishes the change. Redis errors and timeouts become RegistryUnavailableError;
the client retries briefly and reconnects by itself on the next call. The URL picks one server,
Sentinel or Cluster (`redis_connect.py`); with replicas, each write is acknowledged only once
they confirmed it (WAIT), so a failover does not lose it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from functools import partial

from prefix_registry.artifact import PrefixArtifact, PrefixMeta
from prefix_registry.errors import (
    CorruptRecordError,
    PrefixNotFoundError,
    QuotaExceededError,
    TenantNotFoundError,
    excerpt,
)
from prefix_registry.quotas import StorageLimits, prefix_count_exceeded, stored_bytes_exceeded
from prefix_registry.records import artifact_record, corrupt, meta_record, skip_corrupt
from prefix_registry.redis_connect import Command, RedisOptions, connect, parse_redis_url, write
from prefix_registry.redis_keys import (
    DELETE_SCRIPT,
    LIST_SCRIPT,
    META_FIELD,
    META_SCRIPT,
    PUT_SCRIPT,
    Keys,
    change_message,
    meta_fields,
    text,
    unavailable,
)
from prefix_registry.redis_listener import Listener
from prefix_registry.redis_tenants import RedisTenants
from prefix_registry.store import (
    DEFAULT_NAMESPACE,
    DEFAULT_PAGE_SIZE,
    InvalidationCallback,
    MetaList,
    Notifier,
    Page,
    QuotaCallback,
    ResetCallback,
    RevokedCallback,
    Subscription,
    clamp_limit,
)
from prefix_registry.token_buckets import RedisTokenBuckets
from prefix_registry.validation import Limits, parse_ref, validate_name

LATEST_RETRIES = 3  # resolving "latest" again if that version is deleted between two calls
INLINE_PARSE_BYTES = 2**20  # parse and check smaller blobs on the event loop (~1 ms a MiB)


class RedisStore(RedisTenants):
    """PrefixStore on Redis; one instance per process (it owns a connection pool).

    Tenant and API key methods come from `RedisTenants`.
    """

    def __init__(
        self,
        url: str,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        limits: Limits | None = None,
        options: RedisOptions | None = None,
    ) -> None:
        self.limits = limits or Limits()
        self.keys = Keys(namespace)
        self._options = options or RedisOptions()
        self._target = parse_redis_url(url)
        self._replicas = self._target.write_replicas(self._options)
        self._redis = connect(self._target, self._options)
        self._notifier = Notifier()
        self._listener: Listener | None = None
        self._meta_script = self._redis.register_script(META_SCRIPT)
        self._list_script = self._redis.register_script(LIST_SCRIPT)

    @property
    def url(self) -> str:
        """The URL this store was opened with (another client of the same Redis can use it)."""
        return self._target.url

    # ---- prefixes -------------------------------------------------------------------------

    async def put(
        self, artifact: PrefixArtifact, *, limits: StorageLimits | None = None
    ) -> PrefixMeta:
        return (await self.put_many([artifact], limits=limits))[0]

    async def put_many(
        self, artifacts: Sequence[PrefixArtifact], *, chunk: int = 500,
        limits: StorageLimits | None = None,
    ) -> MetaList:
        """`put` for many artifacts, pipelined in chunks (bulk imports, benchmarks); each one is
        atomic. `limits` apply to each artifact's tenant; the first refusal is raised after the
        others were stored."""
        await asyncio.to_thread(self._validate_all, artifacts)
        stored_metas: MetaList = []
        refusals: list[QuotaExceededError] = []
        with unavailable():
            await self._check_tenants({a.meta.tenant for a in artifacts})
            for i in range(0, len(artifacts), chunk):
                stored_metas += await self._write_chunk(
                    artifacts[i : i + chunk], limits or StorageLimits(), refusals
                )
        for meta in stored_metas:
            await self._notifier.changed(meta.tenant, meta.name)
        if refusals:
            raise refusals[0]
        return stored_metas

    def _validate_all(self, artifacts: Sequence[PrefixArtifact]) -> None:
        for artifact in artifacts:  # nothing invalid is ever stored
            artifact.validate(self.limits)

    async def _check_tenants(self, tenants: set[str]) -> None:
        for tenant in sorted(tenants):
            if not await self._redis.hexists(self.keys.tenants, tenant):
                raise TenantNotFoundError(f"tenant {excerpt(tenant)} does not exist")

    async def _write_chunk(
        self, artifacts: Sequence[PrefixArtifact], limits: StorageLimits,
        refusals: list[QuotaExceededError],
    ) -> MetaList:
        """Store a chunk; returns the metas stored and appends what the limits refused."""
        k = self.keys
        async with self._redis.pipeline(transaction=False) as pipe:
            for a in artifacts:  # allocate versions: INCR never hands out a number twice
                pipe.incr(k.seq(a.meta.tenant, a.meta.name))
            versions = await pipe.execute()
        now = time.time()
        stored = [a.stored_as(int(v), now) for a, v in zip(artifacts, versions, strict=True)]
        blobs = await asyncio.to_thread(lambda: [s.to_bytes() for s in stored])
        by_tenant: dict[str, list[tuple[PrefixMeta, bytes]]] = {}
        for meta, blob in zip((s.meta for s in stored), blobs, strict=True):
            by_tenant.setdefault(meta.tenant, []).append((meta, blob))
        answered: dict[tuple[str, str, int], PrefixMeta] = {}  # allocated -> what was stored
        for tenant, items in by_tenant.items():  # a tenant's keys share one slot
            commands = [self._put_command(meta, blob, limits) for meta, blob in items]
            for (meta, _), result in zip(items, await self._write(k.names(tenant), commands),
                                         strict=True):
                code, value = (int(x) for x in result)  # type: ignore[attr-defined]
                if code == 1:
                    answered[_place(meta)] = meta
                elif code == 0:  # a retry of the upload stored as `value`: that version
                    answered[_place(meta)] = await self._replayed(meta, value)
                else:
                    refusals.append(_refusal(meta, code, value, limits))
        return [answered[_place(s.meta)] for s in stored if _place(s.meta) in answered]

    async def _replayed(self, meta: PrefixMeta, version: int) -> PrefixMeta:
        """The stored version a retried upload answers with (its number is left unused)."""
        if version < 1:
            raise corrupt(self.keys.versions(meta.tenant, meta.name), "a version is not a number")
        return await self.get_meta(meta.tenant, f"{meta.name}@{version}")

    def _put_command(self, meta: PrefixMeta, blob: bytes, limits: StorageLimits) -> Command:
        k, (tenant, name, version) = self.keys, (meta.tenant, meta.name, meta.version)
        keys = [k.blob(tenant, name, version), k.meta(tenant, name, version),
                k.versions(tenant, name), k.names(tenant), k.stored_bytes(tenant)]
        args = [blob, version, name, k.channel, change_message(tenant, name), meta.size_bytes,
                _limit(limits.max_prefixes), _limit(limits.max_stored_bytes),
                k.tenant_prefixes(tenant), meta.upload_digest, *meta_fields(meta)]
        return ("EVAL", PUT_SCRIPT, len(keys), *keys, *args)

    async def _write(self, slot_key: str, commands: Sequence[Command]) -> list[object]:
        """Run writes on `slot_key`'s slot; acknowledged once the replicas confirmed them."""
        return await write(self._redis, slot_key, commands, replicas=self._replicas,
                           timeout_s=self._options.write_timeout_s)

    async def get(self, tenant: str, ref: str) -> PrefixArtifact:
        """The artifact, checked like an upload (records.py): a bad blob is a CorruptRecordError."""
        blob, name, version = await self._read_blob(tenant, ref)
        key = self.keys.blob(tenant, name, version)

        def check() -> PrefixArtifact:
            return artifact_record(blob, key=key, tenant=tenant, name=name, version=version,
                                   limits=self.limits)
        if len(blob) < INLINE_PARSE_BYTES:  # parsing is a copy: cheaper than a thread hop
            return check()
        return await asyncio.to_thread(check)

    async def _read_blob(self, tenant: str, ref: str) -> tuple[bytes, str, int]:
        """A plain GET of the blob (a Lua script returning it would copy it once more), with the
        name and version it was read as."""
        validate_name(tenant, "tenant name")
        name, version = parse_ref(ref)
        blob, v = None, version
        with unavailable(self.keys.prefix(tenant, name)):
            for _ in range(LATEST_RETRIES):
                v = version if version is not None else await self._latest(tenant, name)
                blob = None if v is None else await self._redis.get(self.keys.blob(tenant, name, v))
                if blob is not None or v is None or version is not None:
                    break  # else: that newest version was deleted meanwhile, resolve again
        if blob is None or v is None:
            raise PrefixNotFoundError(f"prefix {excerpt(ref)} not found")
        return (blob if isinstance(blob, bytes) else blob.encode()), name, v  # replies are bytes

    async def _latest(self, tenant: str, name: str) -> int | None:
        key = self.keys.versions(tenant, name)
        top = await self._redis.zrevrange(key, 0, 0)
        if not top:
            return None
        if not text(top[0]).isdigit() or int(text(top[0])) < 1:
            raise corrupt(key, f"member {excerpt(text(top[0]))} is not a version number")
        return int(text(top[0]))

    async def get_meta(self, tenant: str, ref: str) -> PrefixMeta:
        """One round trip: the script resolves `name` to the newest version and reads it."""
        validate_name(tenant, "tenant name")
        name, version = parse_ref(ref)
        with unavailable(self.keys.prefix(tenant, name)):
            found = await self._meta_script(
                keys=[self.keys.versions(tenant, name)],
                args=[self.keys.prefix(tenant, name), version or ""],
            )
        v = "" if found is None else text(found[0])
        if v and not v.isdigit():
            raise corrupt(self.keys.versions(tenant, name), f"member {excerpt(v)} is not a version")
        if found is None or not found[1]:
            raise PrefixNotFoundError(f"prefix {excerpt(ref)} not found")
        return meta_record(found[1], key=self.keys.meta(tenant, name, v), tenant=tenant,
                           name=name, version=int(v), limits=self.limits)

    async def exists(self, tenant: str, ref: str) -> bool:
        validate_name(tenant, "tenant name")
        name, version = parse_ref(ref)
        with unavailable():
            if version is None:
                return bool(await self._redis.zcard(self.keys.versions(tenant, name)))
            score = await self._redis.zscore(self.keys.versions(tenant, name), str(version))
        return score is not None

    async def list(
        self, tenant: str, *, limit: int = DEFAULT_PAGE_SIZE, cursor: str | None = None
    ) -> Page:
        validate_name(tenant, "tenant name")
        limit = clamp_limit(limit)
        start = "-" if cursor is None else "(" + validate_name(cursor, "cursor")
        with unavailable(self.keys.names(tenant)):
            if not await self._redis.hexists(self.keys.tenants, tenant):
                raise TenantNotFoundError(f"tenant {excerpt(tenant)} does not exist")
            found = await self._list_script(
                keys=[self.keys.names(tenant)],
                args=[start, limit + 1, self.keys.tenant_prefixes(tenant)],
            )
        names = [text(n) for n in found[0::2]]
        raws = found[1:limit * 2:2]  # "" = just deleted
        metas = [skip_corrupt(partial(self._listed, tenant, n, raw))
                 for n, raw in zip(names, raws, strict=False) if raw]
        next_cursor = names[limit - 1] if len(names) > limit else None
        return Page(items=[m for m in metas if m is not None], next_cursor=next_cursor)

    def _listed(self, tenant: str, name: str, raw: bytes) -> PrefixMeta:
        key = self.keys.meta(tenant, name, "<newest>")
        return meta_record(raw, key=key, tenant=tenant, name=name, version=None,
                           limits=self.limits)

    async def versions(self, tenant: str, name: str) -> MetaList:
        validate_name(tenant, "tenant name")
        validate_name(name)
        with unavailable(self.keys.prefix(tenant, name)):
            found = [text(v) for v in
                     await self._redis.zrange(self.keys.versions(tenant, name), 0, -1)]
            async with self._redis.pipeline(transaction=False) as pipe:
                for v in found:
                    pipe.hget(self.keys.meta(tenant, name, v), META_FIELD)
                raws = await pipe.execute()
        read = [(v, raw) for v, raw in zip(found, raws, strict=True) if raw]
        metas = [skip_corrupt(partial(self._version, tenant, name, v, raw)) for v, raw in read]
        if not read:
            raise PrefixNotFoundError(f"prefix {name!r} not found")
        good = [m for m in metas if m is not None]
        if not good:  # every version is bad: say so, rather than "not found"
            raise CorruptRecordError(f"every stored version of {name!r} is corrupt (logged)",
                                     self.keys.prefix(tenant, name))
        return good

    def _version(self, tenant: str, name: str, version: str, raw: bytes) -> PrefixMeta:
        key = self.keys.meta(tenant, name, version)
        number = int(version) if version.isdigit() else -1  # a bad member fails the check
        return meta_record(raw, key=key, tenant=tenant, name=name, version=number,
                           limits=self.limits)

    async def delete(self, tenant: str, name: str, version: int | None = None) -> int:
        validate_name(tenant, "tenant name")
        validate_name(name)
        k = self.keys
        keys = [k.versions(tenant, name), k.names(tenant), k.stored_bytes(tenant)]
        args = [k.prefix(tenant, name), "" if version is None else str(version), name,
                k.channel, change_message(tenant, name)]
        with unavailable():
            [found] = await self._write(keys[1], [("EVAL", DELETE_SCRIPT, 3, *keys, *args)])
            count = int(found)  # type: ignore[call-overload]
        if count == 0:
            what = name if version is None else f"{name}@{version}"
            raise PrefixNotFoundError(f"prefix {excerpt(what)} not found")
        await self._notifier.changed(tenant, name)
        return count

    # ---- invalidation ---------------------------------------------------------------------

    async def subscribe(
        self, callback: InvalidationCallback | None = None, *,
        on_reset: ResetCallback | None = None, on_revoked: RevokedCallback | None = None,
        on_quota: QuotaCallback | None = None,
    ) -> Subscription:
        subscription = self._notifier.add(callback, on_reset, on_revoked, on_quota)
        if self._listener is None:
            client = connect(self._target, self._options, retries=0)
            self._listener = Listener(client, self.keys.channel, self._notifier)
        await self._listener.start()
        return subscription

    def token_buckets(self) -> RedisTokenBuckets:
        """Tokens-per-minute buckets in this Redis, shared by every server that uses it."""
        return RedisTokenBuckets(self._redis, self.keys)

    # ---- lifecycle ------------------------------------------------------------------------

    async def ping(self) -> None:
        with unavailable():
            await self._redis.ping()

    async def clear_namespace(self) -> int:
        """Delete every key under this store's namespace (maintenance and benchmarks only: it
        SCANs, so it is never on the request path). Returns the number of keys deleted."""
        deleted = 0
        with unavailable():
            batch: list[bytes] = []
            async for key in self._redis.scan_iter(match=f"{self.keys.ns}*", count=1000):
                batch.append(key)
                if len(batch) == 1000:
                    deleted += int(await self._redis.unlink(*batch))
                    batch = []
            if batch:
                deleted += int(await self._redis.unlink(*batch))
        return deleted

    async def close(self) -> None:
        if self._listener is not None:
            await self._listener.close()
            self._listener = None
        await self._redis.aclose()


def _place(meta: PrefixMeta) -> tuple[str, str, int]:
    return meta.tenant, meta.name, meta.version


def _limit(value: int | None) -> int | str:
    return "" if value is None else value


def _refusal(meta: PrefixMeta, code: int, value: int, limits: StorageLimits
             ) -> QuotaExceededError:
    if code == -1:
        assert limits.max_prefixes is not None  # the script checks only a set limit
        return prefix_count_exceeded(meta.tenant, value, limits.max_prefixes)
    assert limits.max_stored_bytes is not None
    return stored_bytes_exceeded(meta.tenant, value, meta.size_bytes, limits.max_stored_bytes)
