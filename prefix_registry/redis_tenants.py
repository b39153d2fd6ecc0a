"""Tenants and API key hashes in Redis (mixed into RedisStore).

The HTTP layer hashes keys (sha256) and compares them in constant time; this module only stores
the hashes: per tenant `key_id -> {key_hash, created_at}`, and one global `key_hash -> tenant`
hash so a request's key resolves in O(1).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from functools import partial

from prefix_registry.errors import ApiKeyNotFoundError, ConflictError, TenantNotFoundError, excerpt
from prefix_registry.quotas import QuotaValue, TenantQuota, TenantUsage, check_quota_changes
from prefix_registry.records import json_record, name_field, skip_corrupt
from prefix_registry.redis_connect import Client, Command
from prefix_registry.redis_keys import (
    ADD_KEY_SCRIPT,
    DELETE_TENANT_SCRIPT,
    PURGE_TENANT_SCRIPT,
    REVOKE_KEY_SCRIPT,
    UPDATE_QUOTA_SCRIPT,
    USAGE_SCRIPT,
    Keys,
    text,
    unavailable,
)
from prefix_registry.store import (
    ApiKeyInfo,
    KeyList,
    Notifier,
    TenantDeletion,
    TenantInfo,
    TenantList,
)
from prefix_registry.validation import validate_key_hash, validate_name


class RedisTenants:
    """Tenant records, API keys and quotas live in the `{registry}` slot (see redis_keys.py);
    a tenant's usage is read from its own slot."""

    keys: Keys
    _redis: Client
    _notifier: Notifier

    async def _write(self, slot_key: str, commands: Sequence[Command]) -> list[object]:
        raise NotImplementedError  # RedisStore's

    async def _registry_write(self, command: Command) -> int:
        [result] = await self._write(self.keys.tenants, [command])
        return int(result)  # type: ignore[call-overload]

    async def create_tenant(self, name: str) -> TenantInfo:
        validate_name(name, "tenant name")
        created_at = time.time()
        with unavailable():
            record = json.dumps({"created_at": created_at})
            if not await self._registry_write(("HSETNX", self.keys.tenants, name, record)):
                raise ConflictError(f"tenant {excerpt(name)} already exists")
            # A new tenant starts empty, even if an upload racing with the deletion of an
            # earlier tenant of this name left something behind.
            await self._purge_prefixes(name)
        return TenantInfo(name=name, created_at=created_at)

    async def delete_tenant(self, name: str) -> TenantDeletion:
        validate_name(name, "tenant name")
        k = self.keys
        with unavailable():
            keys = [k.tenants, k.tenant_keys(name), k.key_hashes, k.quota(name)]
            [found] = await self._write(k.tenants, [
                ("EVAL", DELETE_TENANT_SCRIPT, 4, *keys, name, k.channel)])
        if found is None:
            raise TenantNotFoundError(f"tenant {excerpt(name)} does not exist")
        hashes = [text(h) for h in found]  # type: ignore[attr-defined]
        await self._notifier.revoked(hashes)
        with unavailable():
            versions, names = await self._purge_prefixes(name)
        for prefix in names:
            await self._notifier.changed(name, prefix)
        return TenantDeletion(keys=len(hashes), prefixes=versions)

    async def _purge_prefixes(self, tenant: str) -> tuple[int, list[str]]:
        k = self.keys
        [out] = await self._write(k.names(tenant), [
            ("EVAL", PURGE_TENANT_SCRIPT, 2, k.names(tenant), k.stored_bytes(tenant),
             k.tenant_prefixes(tenant), k.channel, tenant)])
        reply: list[object] = list(out)  # type: ignore[call-overload]
        return int(reply[0]), [text(n) for n in reply[1:]]  # type: ignore[call-overload]

    async def list_tenants(self) -> TenantList:
        with unavailable():
            raw = await self._redis.hgetall(self.keys.tenants)
        found = [skip_corrupt(partial(self._tenant_info, text(k), v)) for k, v in raw.items()]
        return sorted((t for t in found if t is not None), key=lambda t: t.name)

    def _tenant_info(self, name: str, raw: bytes | str) -> TenantInfo:
        key = f"{self.keys.tenants}[{excerpt(name)}]"
        record = json_record(raw, key=key, fields={"created_at": float})
        return TenantInfo(name, record["created_at"])

    async def tenant_exists(self, name: str) -> bool:
        with unavailable():
            return bool(await self._redis.hexists(self.keys.tenants, name))

    async def add_key(
        self, tenant: str, key_id: str, key_hash: str, created_at: float
    ) -> ApiKeyInfo:
        validate_name(key_id, "key id")
        validate_key_hash(key_hash)
        k = self.keys
        key_record = json.dumps({"key_hash": key_hash, "created_at": created_at})
        hash_record = json.dumps({"tenant": tenant, "key_id": key_id})
        with unavailable():
            keys = [k.tenants, k.tenant_keys(tenant), k.key_hashes]
            args = [tenant, key_id, key_hash, key_record, hash_record]
            code = await self._registry_write(("EVAL", ADD_KEY_SCRIPT, 3, *keys, *args))
        if code == -1:
            raise TenantNotFoundError(f"tenant {excerpt(tenant)} does not exist")
        if code in (-2, -3):
            what = f"key id {excerpt(key_id)}" if code == -2 else "this key hash"
            raise ConflictError(f"{what} already exists")
        return ApiKeyInfo(key_id=key_id, created_at=created_at)

    async def list_keys(self, tenant: str) -> KeyList:
        with unavailable():
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hexists(self.keys.tenants, tenant)
                pipe.hgetall(self.keys.tenant_keys(tenant))
                known, raw = await pipe.execute()
        if not known:
            raise TenantNotFoundError(f"tenant {excerpt(tenant)} does not exist")
        where = self.keys.tenant_keys(tenant)
        found = [skip_corrupt(partial(_key_info, where, text(k), v)) for k, v in raw.items()]
        return sorted((k for k in found if k is not None),
                      key=lambda key: (key.created_at, key.key_id))

    async def revoke_key(self, tenant: str, key_id: str) -> None:
        k = self.keys
        with unavailable():
            keys = [k.tenant_keys(tenant), k.key_hashes]
            [revoked] = await self._write(k.tenants, [
                ("EVAL", REVOKE_KEY_SCRIPT, 2, *keys, key_id, k.channel, tenant)])
        if revoked is None:
            raise ApiKeyNotFoundError(f"tenant {excerpt(tenant)} has no key {excerpt(key_id)}")
        if text(revoked):  # "": its record was corrupt and no key-hash record named it
            await self._notifier.revoked([text(revoked)])

    async def tenant_for_key_hash(self, key_hash: str) -> str | None:
        with unavailable(self.keys.key_hashes):
            raw = await self._redis.hget(self.keys.key_hashes, key_hash)
        if raw is None:
            return None
        key = f"{self.keys.key_hashes}[{key_hash[:12]}...]"  # never the whole hash in a log
        return name_field(json_record(raw, key=key, fields={}), "tenant", key)

    async def get_quota(self, tenant: str) -> TenantQuota:
        with unavailable():
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hexists(self.keys.tenants, tenant)
                pipe.hgetall(self.keys.quota(tenant))
                known, raw = await pipe.execute()
        if not known:
            raise TenantNotFoundError(f"tenant {excerpt(tenant)} does not exist")
        return TenantQuota.from_stored(raw, where=self.keys.quota(tenant))

    async def update_quota(
        self, tenant: str, changes: Mapping[str, QuotaValue | None]
    ) -> TenantQuota:
        checked = check_quota_changes(changes)
        args: list[str] = [tenant, self.keys.channel]
        for field, value in checked.items():
            args += [field, "" if value is None else json.dumps(value)]
        keys = [self.keys.tenants, self.keys.quota(tenant)]
        with unavailable():
            [found] = await self._write(keys[0], [("EVAL", UPDATE_QUOTA_SCRIPT, 2, *keys, *args)])
        if found is None:
            raise TenantNotFoundError(f"tenant {excerpt(tenant)} does not exist")
        flat = list(found)  # type: ignore[call-overload]
        return TenantQuota.from_stored(dict(zip(flat[0::2], flat[1::2], strict=True)),
                                       where=self.keys.quota(tenant))

    async def usage(self, tenant: str) -> TenantUsage:
        k = self.keys
        with unavailable():
            if not await self._redis.hexists(k.tenants, tenant):
                raise TenantNotFoundError(f"tenant {excerpt(tenant)} does not exist")
            keys = [k.stored_bytes(tenant), k.names(tenant)]
            command = ("EVAL", USAGE_SCRIPT, 2, *keys, k.tenant_prefixes(tenant))
            [found] = await self._write(keys[1], [command])
        prefixes, stored = (int(x) for x in found)  # type: ignore[attr-defined]
        return TenantUsage(prefixes=prefixes, stored_bytes=stored)


def _key_info(where: str, key_id: str, raw: bytes | str) -> ApiKeyInfo:
    key = f"{where}[{excerpt(key_id)}]"
    record = json_record(raw, key=key, fields={"key_hash": str, "created_at": float})
    return ApiKeyInfo(key_id, record["created_at"])
