"""The registry on a highly available Redis: Sentinel and Cluster, with real processes.

The primary is killed (SIGKILL) while writers keep uploading. Every write the store acknowledged
must still be there after the failover, writes must succeed again by themselves, and the change
announcements must reach subscribers again. The figures (acknowledged writes, failed attempts,
seconds without a successful write) are printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from prefix_registry.artifact import PrefixMeta
from prefix_registry.errors import QuotaExceededError, RegistryUnavailableError
from prefix_registry.quotas import StorageLimits, TenantQuota
from prefix_registry.redis_connect import parse_redis_url
from prefix_registry.redis_store import RedisStore
from tests.redis_procs import (
    Topology,
    cluster_primary_of,
    missing_binaries,
    redis_cluster,
    sentinel_group,
    sentinel_primary,
)
from tests.registry.conftest import MakeArtifact

pytestmark = pytest.mark.skipif(missing_binaries() is not None, reason=str(missing_binaries()))

TENANTS = ("acme", "globex", "initech")  # three tenants: three hash slots on a cluster
FAILOVER_DEADLINE_S = 60.0  # generous: a loaded 2-core machine; failover takes a few seconds


@dataclass
class Traffic:
    acked: list[PrefixMeta] = field(default_factory=list)
    failed: int = 0
    last_ok: float = 0.0
    longest_gap_s: float = 0.0  # the longest time between two acknowledged writes

    def ok(self, meta: PrefixMeta) -> None:
        now = time.monotonic()
        if self.last_ok:
            self.longest_gap_s = max(self.longest_gap_s, now - self.last_ok)
        self.acked.append(meta)
        self.last_ok = now


async def _write_loop(store: RedisStore, make_artifact: MakeArtifact, tenant: str,
                      traffic: Traffic, stop: asyncio.Event) -> None:
    i = 0
    while not stop.is_set():
        i += 1
        try:
            traffic.ok(await store.put(make_artifact(f"p{i % 4}", tenant, seed=i)))
        except RegistryUnavailableError:
            traffic.failed += 1
            await asyncio.sleep(0.05)


async def _acked_after(traffic: dict[str, Traffic], count: int) -> None:
    """Wait until every tenant's writer got `count` more writes acknowledged."""
    targets = {tenant: len(t.acked) + count for tenant, t in traffic.items()}
    deadline = time.monotonic() + FAILOVER_DEADLINE_S
    while any(len(t.acked) < targets[tenant] for tenant, t in traffic.items()):
        assert time.monotonic() < deadline, "writes did not resume after the failover"
        await asyncio.sleep(0.05)


async def _kill_during_traffic(url: str, make_artifact: MakeArtifact, kill: object) -> None:
    """Writers on every tenant; `kill()` after some acknowledged writes; then more writes."""
    store = RedisStore(url, namespace="ha:")
    for tenant in TENANTS:
        await store.create_tenant(tenant)
    changes: list[tuple[str, str]] = []
    await store.subscribe(lambda tenant, name: changes.append((tenant, name)))
    traffic, stop = {t: Traffic() for t in TENANTS}, asyncio.Event()
    writers = [asyncio.create_task(_write_loop(store, make_artifact, t, traffic[t], stop))
               for t in TENANTS]
    try:
        await _acked_after(traffic, 10)
        await asyncio.to_thread(kill)  # type: ignore[arg-type]
        await _acked_after(traffic, 10)
    finally:
        stop.set()
        await asyncio.gather(*writers)
    acked = [meta for t in traffic.values() for meta in t.acked]
    await _check_nothing_acknowledged_was_lost(url, acked)
    await _check_announcements_resume(store, make_artifact, changes)
    await store.close()
    failed = sum(t.failed for t in traffic.values())
    gap = max(t.longest_gap_s for t in traffic.values())
    print(f"\n{parse_redis_url(url).topology}: {len(acked)} writes acknowledged, {failed} "
          f"attempts refused during the failover, writes resumed after at most {gap:.2f}s "
          "(longest gap between acknowledged writes of one tenant); 0 acknowledged writes lost")


async def _check_nothing_acknowledged_was_lost(url: str, acked: list[PrefixMeta]) -> None:
    reader = RedisStore(url, namespace="ha:")  # a fresh client: nothing cached
    try:
        for meta in acked:
            ref = f"{meta.name}@{meta.version}"
            found = await reader.get_meta(meta.tenant, ref)
            assert found.sha256 == meta.sha256, f"{meta.tenant}/{ref} changed"
    finally:
        await reader.close()


async def _check_announcements_resume(store: RedisStore, make_artifact: MakeArtifact,
                                      changes: list[tuple[str, str]]) -> None:
    """A write from another client after the failover reaches this store's subscriber."""
    other = RedisStore(store.url, namespace="ha:")
    deadline = time.monotonic() + FAILOVER_DEADLINE_S
    try:
        while ("acme", "after") not in changes:
            assert time.monotonic() < deadline, "change announcements did not resume"
            with contextlib.suppress(RegistryUnavailableError):
                await other.put(make_artifact("after", "acme"))
            await asyncio.sleep(0.5)
    finally:
        await other.close()


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[Topology]:
    with sentinel_group(tmp_path) as topo:
        yield topo


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Topology]:
    with redis_cluster(tmp_path) as topo:
        yield topo


async def test_sentinel_failover_loses_no_acknowledged_write(
    sentinels: Topology, make_artifact: MakeArtifact
) -> None:
    primary = sentinel_primary(sentinels)
    await _kill_during_traffic(sentinels.sentinel_url, make_artifact,
                               sentinels.node(primary).kill)
    assert sentinel_primary(sentinels) != primary  # the sentinels promoted a replica


async def test_cluster_failover_loses_no_acknowledged_write(
    cluster: Topology, make_artifact: MakeArtifact
) -> None:
    tenant_slot_key = "ha:{t:acme}:names"  # acme's prefixes live on this slot's primary
    primary = cluster_primary_of(cluster, tenant_slot_key)
    await _kill_during_traffic(cluster.cluster_url, make_artifact, cluster.node(primary).kill)
    alive = next(n for n in cluster.nodes if n.port != primary)
    assert cluster_primary_of(Topology([alive]), tenant_slot_key) != primary


async def test_cluster_store_passes_the_basics(
    cluster: Topology, make_artifact: MakeArtifact
) -> None:
    """Listing, versions, deletes, API keys and quotas work across slots of a cluster."""
    store = RedisStore(cluster.cluster_url, namespace="basics:")
    try:
        for tenant in TENANTS:
            await store.create_tenant(tenant)
            await store.put(make_artifact("a", tenant))
            await store.put(make_artifact("b", tenant, seed=1))
            await store.put(make_artifact("b", tenant, seed=2))
        await store.add_key("acme", "k1", "c" * 64, 1.0)
        assert await store.tenant_for_key_hash("c" * 64) == "acme"
        page = await store.list("globex")
        assert [(m.name, m.version) for m in page.items] == [("a", 1), ("b", 2)]
        assert [m.version for m in await store.versions("initech", "b")] == [1, 2]
        assert await store.delete("initech", "b", 2) == 1
        assert (await store.get("initech", "b")).meta.version == 1
        await store.revoke_key("acme", "k1")
        assert await store.tenant_for_key_hash("c" * 64) is None
        await store.update_quota("acme", {"weight": 2, "max_prefixes": 2})
        assert await store.get_quota("acme") == TenantQuota(weight=2.0, max_prefixes=2)
        assert (await store.usage("initech")).prefixes == 2
        with pytest.raises(QuotaExceededError):
            await store.put(make_artifact("c", "acme"), limits=StorageLimits(max_prefixes=2))
        assert await store.clear_namespace() > 0
    finally:
        await store.close()


def test_registry_urls_name_the_topology() -> None:
    sentinel = parse_redis_url("redis+sentinel://:pw@h1:26380,h2/mymaster/2?sentinel_password=s")
    assert (sentinel.topology, sentinel.nodes, sentinel.service, sentinel.db) == (
        "sentinel", (("h1", 26380), ("h2", 26379)), "mymaster", 2)
    assert (sentinel.password, sentinel.sentinel_password) == ("pw", "s")
    cluster = parse_redis_url("redis+cluster://u:p@a:7000,[::1]:7001")
    assert (cluster.topology, cluster.nodes) == ("cluster", (("a", 7000), ("::1", 7001)))
    assert (cluster.username, cluster.password) == ("u", "p")
    assert parse_redis_url("redis://localhost:6379/0").topology == "single"
    assert parse_redis_url("redis+cluster://a:7000?write_replicas=0").replicas == 0
    with pytest.raises(ValueError, match="write_replicas"):
        parse_redis_url("redis+cluster://a:7000?write_replicas=-1")
    with pytest.raises(ValueError, match="service name"):
        parse_redis_url("redis+sentinel://h1:26379")
    with pytest.raises(ValueError, match="database 0"):
        parse_redis_url("redis+cluster://h1:7000/3")
