"""The PrefixStore contract: every test runs against the local directory store and the real
Redis store (the `store` fixture is parametrized over both)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
import torch

from prefix_registry.errors import (
    ApiKeyNotFoundError,
    ConflictError,
    InvalidPrefixError,
    InvalidQuotaError,
    PrefixNotFoundError,
    QuotaExceededError,
    TenantNotFoundError,
)
from prefix_registry.quotas import StorageLimits, TenantQuota, TenantUsage
from prefix_registry.store import PrefixStore
from tests.registry.conftest import MakeArtifact

HASH_A = "a" * 64
HASH_B = "b" * 64


async def _tenant(store: PrefixStore, name: str = "acme") -> str:
    await store.create_tenant(name)
    return name


async def test_put_assigns_versions_and_get_resolves_refs(
    store: PrefixStore, make_artifact: MakeArtifact
) -> None:
    await _tenant(store)
    first = await store.put(make_artifact(seed=1, description="one"))
    second = await store.put(make_artifact(seed=2, form="p_theta", description="two"))
    assert (first.version, second.version) == (1, 2)
    assert first.created_at > 0 and second.created_at >= first.created_at
    latest = await store.get("acme", "style")
    assert latest.meta == second
    assert torch.equal(latest.tensors["p_theta"], make_artifact(seed=2, form="p_theta")
                       .tensors["p_theta"])
    pinned = await store.get("acme", "style@1")
    assert pinned.meta.description == "one" and pinned.meta.form == "kv"
    for name in ("keys", "values"):
        assert torch.equal(pinned.tensors[name], make_artifact(seed=1).tensors[name])
    assert await store.get_meta("acme", "style@2") == second
    assert await store.get_meta("acme", "style") == second


async def test_missing_refs(store: PrefixStore, make_artifact: MakeArtifact) -> None:
    await _tenant(store)
    await store.put(make_artifact())
    for ref in ("nope", "style@2", "nope@1"):
        with pytest.raises(PrefixNotFoundError):
            await store.get("acme", ref)
        with pytest.raises(PrefixNotFoundError):
            await store.get_meta("acme", ref)
        assert not await store.exists("acme", ref)
    assert await store.exists("acme", "style") and await store.exists("acme", "style@1")
    for bad in ("style@0", "style@x", "a b", "@1", ""):
        with pytest.raises(InvalidPrefixError):
            await store.get("acme", bad)


async def test_versions_lists_every_version(store: PrefixStore, make_artifact: MakeArtifact
                                            ) -> None:
    await _tenant(store)
    for seed in range(3):
        await store.put(make_artifact(seed=seed))
    metas = await store.versions("acme", "style")
    assert [m.version for m in metas] == [1, 2, 3]
    assert len({m.sha256 for m in metas}) == 3
    with pytest.raises(PrefixNotFoundError):
        await store.versions("acme", "other")


async def test_list_paginates_by_name_with_latest_versions(
    store: PrefixStore, make_artifact: MakeArtifact
) -> None:
    await _tenant(store)
    names = [f"p{i:02d}" for i in range(7)]
    for name in reversed(names):
        await store.put(make_artifact(name=name))
    await store.put(make_artifact(name="p03", seed=9))  # p03 now has version 2
    seen, cursor, pages = [], None, 0
    while True:
        page = await store.list("acme", limit=3, cursor=cursor)
        seen.extend(page.items)
        pages += 1
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert [m.name for m in seen] == names and pages == 3
    assert {m.name: m.version for m in seen}["p03"] == 2
    assert (await store.list("acme", limit=7)).next_cursor is None
    with pytest.raises(TenantNotFoundError):
        await store.list("ghost")


async def test_delete_one_version_then_all(store: PrefixStore, make_artifact: MakeArtifact
                                           ) -> None:
    await _tenant(store)
    for seed in range(3):
        await store.put(make_artifact(seed=seed))
    assert await store.delete("acme", "style", version=3) == 1
    assert (await store.get_meta("acme", "style")).version == 2  # latest falls back
    with pytest.raises(PrefixNotFoundError):
        await store.delete("acme", "style", version=3)
    assert await store.delete("acme", "style") == 2
    assert not await store.exists("acme", "style")
    assert (await store.list("acme")).items == []
    with pytest.raises(PrefixNotFoundError):
        await store.delete("acme", "style")


async def test_version_numbers_are_never_reused(store: PrefixStore, make_artifact: MakeArtifact
                                                ) -> None:
    await _tenant(store)
    await store.put(make_artifact(seed=1))
    await store.put(make_artifact(seed=2))
    await store.delete("acme", "style", version=2)
    assert (await store.put(make_artifact(seed=3))).version == 3
    await store.delete("acme", "style")
    again = await store.put(make_artifact(seed=4))
    assert again.version == 4
    assert [m.version for m in await store.versions("acme", "style")] == [4]


async def test_names_are_isolated_per_tenant(store: PrefixStore, make_artifact: MakeArtifact
                                             ) -> None:
    await _tenant(store, "acme")
    await _tenant(store, "globex")
    await store.put(make_artifact(tenant="acme", seed=1))
    b = await store.put(make_artifact(tenant="globex", seed=2))
    assert b.version == 1  # its own version sequence
    assert (await store.get("acme", "style")).meta.tenant == "acme"
    assert (await store.get("globex", "style")).meta.sha256 == b.sha256
    await store.delete("globex", "style")
    assert await store.exists("acme", "style")
    assert [m.tenant for m in (await store.list("acme")).items] == ["acme"]


async def test_put_needs_an_existing_tenant_and_valid_artifact(
    store: PrefixStore, make_artifact: MakeArtifact
) -> None:
    with pytest.raises(TenantNotFoundError):
        await store.put(make_artifact(tenant="ghost"))
    await _tenant(store)
    good = make_artifact()
    bad = type(good)(meta=good.meta, tensors={**good.tensors, "values": good.tensors["keys"] * 2})
    with pytest.raises(InvalidPrefixError, match="sha256"):
        await store.put(bad)
    nan = {k: v.clone() for k, v in good.tensors.items()}
    nan["keys"][0, 0, 0, 0] = float("nan")
    with pytest.raises(InvalidPrefixError, match="NaN"):
        await store.put(type(good)(meta=good.meta, tensors=nan))
    assert not await store.exists("acme", "style")


async def test_concurrent_writers_get_distinct_versions(
    store: PrefixStore, make_artifact: MakeArtifact
) -> None:
    await _tenant(store)
    artifacts = [make_artifact(seed=i, description=f"w{i}") for i in range(20)]
    metas = await asyncio.gather(*(store.put(a) for a in artifacts))
    assert sorted(m.version for m in metas) == list(range(1, 21))
    for artifact, meta in zip(artifacts, metas, strict=True):
        got = await store.get("acme", meta.ref)
        assert got.meta.description == artifact.meta.description
        assert torch.equal(got.tensors["keys"], artifact.tensors["keys"])
    assert (await store.get_meta("acme", "style")).version == 20


async def test_tenants(store: PrefixStore) -> None:
    assert not await store.tenant_exists("acme")
    created = await store.create_tenant("acme")
    await store.create_tenant("beta")
    assert await store.tenant_exists("acme")
    with pytest.raises(ConflictError):
        await store.create_tenant("acme")
    tenants = await store.list_tenants()
    assert [t.name for t in tenants] == ["acme", "beta"]
    assert tenants[0].created_at == pytest.approx(created.created_at)
    with pytest.raises(InvalidPrefixError):
        await store.create_tenant("bad:name")


async def test_api_keys(store: PrefixStore) -> None:
    await _tenant(store, "acme")
    await _tenant(store, "beta")
    await store.add_key("acme", "k1", HASH_A, 100.0)
    await store.add_key("acme", "k2", HASH_B, 200.0)
    assert [(k.key_id, k.created_at) for k in await store.list_keys("acme")] == [
        ("k1", 100.0), ("k2", 200.0)]
    assert await store.list_keys("beta") == []
    assert await store.tenant_for_key_hash(HASH_A) == "acme"
    assert await store.tenant_for_key_hash("c" * 64) is None
    with pytest.raises(ConflictError):
        await store.add_key("acme", "k1", "d" * 64, 1.0)  # id taken
    with pytest.raises(ConflictError):
        await store.add_key("beta", "k9", HASH_A, 1.0)  # hash taken
    with pytest.raises(TenantNotFoundError):
        await store.add_key("ghost", "k1", "e" * 64, 1.0)
    with pytest.raises(TenantNotFoundError):
        await store.list_keys("ghost")
    await store.revoke_key("acme", "k1")
    assert await store.tenant_for_key_hash(HASH_A) is None
    assert [k.key_id for k in await store.list_keys("acme")] == ["k2"]
    with pytest.raises(ApiKeyNotFoundError):
        await store.revoke_key("acme", "k1")
    with pytest.raises(ApiKeyNotFoundError):
        await store.revoke_key("beta", "k2")  # another tenant's key


async def test_subscribers_hear_changes(store: PrefixStore, make_artifact: MakeArtifact) -> None:
    await _tenant(store)
    heard: list[tuple[str, str]] = []
    quotas: list[str] = []
    subscription = await store.subscribe(lambda t, n: heard.append((t, n)),
                                         on_quota=quotas.append)
    await store.put(make_artifact())
    await store.delete("acme", "style")
    await store.update_quota("acme", {"max_running": 3})
    await _until(lambda: heard.count(("acme", "style")) >= 2 and quotas == ["acme"])
    subscription.close()
    count = len(heard)
    await store.put(make_artifact())
    await asyncio.sleep(0.2)
    assert len(heard) == count


async def _until(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


# --- quotas -------------------------------------------------------------------------------------


async def test_quota_fields_are_set_and_cleared(store: PrefixStore) -> None:
    await _tenant(store)
    assert await store.get_quota("acme") == TenantQuota()
    set_ = await store.update_quota("acme", {"weight": 2, "max_running": 3,
                                             "tokens_per_minute": 10_000})
    assert set_ == TenantQuota(weight=2.0, max_running=3, tokens_per_minute=10_000)
    assert isinstance(set_.weight, float) and isinstance(set_.max_running, int)
    assert await store.get_quota("acme") == set_
    cleared = await store.update_quota("acme", {"weight": None, "max_stored_bytes": 4096})
    assert cleared == TenantQuota(max_running=3, tokens_per_minute=10_000, max_stored_bytes=4096)
    assert await store.get_quota("acme") == cleared
    await _tenant(store, "beta")
    assert await store.get_quota("beta") == TenantQuota()  # each tenant its own
    for call in (store.get_quota("ghost"), store.update_quota("ghost", {"weight": 1})):
        with pytest.raises(TenantNotFoundError):
            await call


@pytest.mark.parametrize("changes", [
    {"weight": 0}, {"weight": float("nan")}, {"max_running": 1.5}, {"max_queued": 0},
    {"max_running": True}, {"tokens_per_minute": "100"}, {"max_prefixes": -1},
    {"max_stored_bytes": 2**60}, {"colour": 1}, {"weight": 2, "max_running": 0},
])
async def test_invalid_quota_values_change_nothing(store: PrefixStore,
                                                   changes: dict[str, object]) -> None:
    await _tenant(store)
    await store.update_quota("acme", {"max_running": 7})
    with pytest.raises(InvalidQuotaError):
        await store.update_quota("acme", changes)  # type: ignore[arg-type]
    assert await store.get_quota("acme") == TenantQuota(max_running=7)


async def test_usage_counts_prefix_names_and_stored_bytes(
    store: PrefixStore, make_artifact: MakeArtifact
) -> None:
    await _tenant(store)
    assert await store.usage("acme") == TenantUsage(prefixes=0, stored_bytes=0)
    metas = [await store.put(make_artifact(name=n, seed=s, prefix_len=p))
             for n, s, p in [("a", 1, 3), ("a", 2, 5), ("b", 3, 2)]]
    assert await store.usage("acme") == TenantUsage(2, sum(m.size_bytes for m in metas))
    await store.delete("acme", "a", version=1)
    assert await store.usage("acme") == TenantUsage(2, metas[1].size_bytes + metas[2].size_bytes)
    await store.delete("acme", "a")
    assert await store.usage("acme") == TenantUsage(1, metas[2].size_bytes)
    with pytest.raises(TenantNotFoundError):
        await store.usage("ghost")


async def test_put_stays_within_storage_limits(store: PrefixStore,
                                               make_artifact: MakeArtifact) -> None:
    await _tenant(store)
    size = make_artifact().meta.size_bytes
    two_names = StorageLimits(max_prefixes=2)
    await store.put(make_artifact(name="a"), limits=two_names)
    await store.put(make_artifact(name="b"), limits=two_names)
    with pytest.raises(QuotaExceededError, match="at most 2 prefixes"):
        await store.put(make_artifact(name="c"), limits=two_names)
    assert not await store.exists("acme", "c")
    await store.put(make_artifact(name="a", seed=5), limits=two_names)  # a new version: fine
    bytes_limit = StorageLimits(max_stored_bytes=4 * size)
    with pytest.raises(QuotaExceededError, match=f"stores {3 * size} and this version needs"):
        await store.put(make_artifact(name="a", seed=6, prefix_len=6), limits=bytes_limit)
    await store.put(make_artifact(name="b", seed=7), limits=bytes_limit)  # exactly at the limit
    with pytest.raises(QuotaExceededError):
        await store.put(make_artifact(name="b", seed=8), limits=bytes_limit)
    await store.delete("acme", "a", version=1)
    await store.put(make_artifact(name="b", seed=8), limits=bytes_limit)  # room again
    assert await store.usage("acme") == TenantUsage(2, 4 * size)
    await store.put(make_artifact(name="c"))  # no limits given: none apply


async def test_concurrent_puts_cannot_overshoot_the_limits(
    store: PrefixStore, make_artifact: MakeArtifact
) -> None:
    await _tenant(store)
    limits = StorageLimits(max_prefixes=3)
    results = await asyncio.gather(
        *(store.put(make_artifact(name=f"p{i}", seed=i), limits=limits) for i in range(10)),
        return_exceptions=True,
    )
    assert sum(not isinstance(r, BaseException) for r in results) == 3
    assert all(isinstance(r, QuotaExceededError) for r in results if isinstance(r, BaseException))
    assert (await store.usage("acme")).prefixes == 3
