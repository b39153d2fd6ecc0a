"""Revocation announcements, tenant deletion and leftovers of interrupted writes, in both stores
(the `store` fixture runs each test on the local directory and on the real Redis)."""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from prefix_registry.errors import PrefixNotFoundError, TenantNotFoundError
from prefix_registry.factory import open_store
from prefix_registry.local_files import ORPHAN_MIN_AGE_S
from prefix_registry.local_store import LocalStore
from prefix_registry.redis_store import RedisStore
from prefix_registry.store import PrefixStore
from tests.registry.conftest import MakeArtifact

HASH_A, HASH_B, HASH_C = "a" * 64, "b" * 64, "c" * 64


async def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_a_revoked_key_is_announced(store: PrefixStore) -> None:
    await store.create_tenant("acme")
    await store.add_key("acme", "k1", HASH_A, 1.0)
    revoked: list[list[str]] = []
    await store.subscribe(on_revoked=revoked.append)  # no change callback: optional
    await store.revoke_key("acme", "k1")
    await _until(lambda: [HASH_A] in revoked)


async def test_a_subscriber_names_only_what_it_listens_for(
    store: PrefixStore, make_artifact: MakeArtifact
) -> None:
    """No change callback to pass as a no-op: prefix changes reach the other subscribers only."""
    changed: list[tuple[str, str]] = []
    revoked: list[list[str]] = []
    await store.subscribe(on_revoked=revoked.append)
    await store.subscribe(lambda t, n: changed.append((t, n)))
    await store.create_tenant("acme")
    await store.put(make_artifact())
    await store.add_key("acme", "k1", HASH_A, 1.0)
    await store.revoke_key("acme", "k1")
    await _until(lambda: ("acme", "style") in changed and [HASH_A] in revoked)


async def test_a_revocation_reaches_another_process(redis_store: RedisStore, redis_url: str,
                                                    namespace: str) -> None:
    other = RedisStore(redis_url, namespace=namespace)  # another server sharing the registry
    try:
        revoked: list[list[str]] = []
        await other.subscribe(on_revoked=revoked.append)
        await redis_store.create_tenant("acme")
        await redis_store.add_key("acme", "k1", HASH_A, 1.0)
        await redis_store.revoke_key("acme", "k1")
        await _until(lambda: [HASH_A] in revoked)
    finally:
        await other.close()


async def test_deleting_a_tenant_removes_its_keys_and_prefixes(
    store: PrefixStore, make_artifact: MakeArtifact
) -> None:
    for tenant in ("acme", "beta"):
        await store.create_tenant(tenant)
    await store.add_key("acme", "k1", HASH_A, 1.0)
    await store.add_key("acme", "k2", HASH_B, 2.0)
    await store.add_key("beta", "k1", HASH_C, 1.0)
    await store.put(make_artifact("style", "acme", seed=1))
    await store.put(make_artifact("style", "acme", seed=2))
    await store.put(make_artifact("tone", "acme"))
    await store.put(make_artifact("style", "beta"))
    revoked: list[str] = []
    changed: list[tuple[str, str]] = []
    await store.subscribe(lambda t, n: changed.append((t, n)), on_revoked=revoked.extend)

    deletion = await store.delete_tenant("acme")

    assert (deletion.keys, deletion.prefixes) == (2, 3)
    assert not await store.tenant_exists("acme")
    assert [t.name for t in await store.list_tenants()] == ["beta"]
    assert await store.tenant_for_key_hash(HASH_A) is None
    assert await store.tenant_for_key_hash(HASH_B) is None
    with pytest.raises(PrefixNotFoundError):
        await store.get("acme", "style@1")
    await _until(lambda: {HASH_A, HASH_B} <= set(revoked))
    await _until(lambda: {("acme", "style"), ("acme", "tone")} <= set(changed))
    # the other tenant is untouched
    assert await store.tenant_for_key_hash(HASH_C) == "beta"
    assert (await store.get("beta", "style")).meta.version == 1
    with pytest.raises(TenantNotFoundError):
        await store.delete_tenant("acme")


async def test_a_tenant_created_again_starts_empty(store: PrefixStore,
                                                   make_artifact: MakeArtifact) -> None:
    await store.create_tenant("acme")
    await store.add_key("acme", "k1", HASH_A, 1.0)
    await store.put(make_artifact("style", "acme"))
    await store.delete_tenant("acme")
    await store.create_tenant("acme")
    assert (await store.list("acme")).items == []
    assert await store.list_keys("acme") == []
    assert not await store.exists("acme", "style")


async def test_deleting_an_unknown_tenant_is_not_found(store: PrefixStore) -> None:
    with pytest.raises(TenantNotFoundError):
        await store.delete_tenant("ghost")


def _orphan(path: Path, age_s: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{'0' * 32}.tmp")
    tmp.write_bytes(b"half a file")
    old = time.time() - age_s
    os.utime(tmp, (old, old))
    return tmp


def test_temporary_files_of_a_dead_writer_are_removed_at_open(tmp_path: Path) -> None:
    root = tmp_path / "registry"
    version = root / "tenants" / "acme" / "prefixes" / "style" / "3.safetensors"
    orphans = [_orphan(version, 60), _orphan(root / "key-hashes" / "x.json", 60)]
    young = _orphan(root / "tenants" / "acme" / "tenant.json", 0)  # a writer may lock it now
    held = _orphan(root / "tenants" / "beta" / "tenant.json", 60)
    with open(held, "rb") as live:  # a live writer's lock
        fcntl.flock(live, fcntl.LOCK_EX)
        store = open_store(None, directory=root)
        assert isinstance(store, LocalStore)
    assert not any(p.exists() for p in orphans)
    assert young.exists() and held.exists()
    assert ORPHAN_MIN_AGE_S < 60
