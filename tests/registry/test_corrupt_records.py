"""Records read back from either store are checked like an upload: each corruption of
`tests/corrupt_records.py` fails only the read of that record, with CorruptRecordError (never an
InvalidPrefixError, which the server would answer as a 422 blaming the caller), and listings leave
the bad record out instead of failing. Retried uploads answer with the version they made."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis

from prefix_registry.errors import (
    CorruptRecordError,
    InvalidPrefixError,
    PrefixNotFoundError,
    RegistryUnavailableError,
)
from prefix_registry.local_store import LocalStore
from prefix_registry.quotas import StorageLimits
from prefix_registry.redis_connect import RedisOptions
from prefix_registry.redis_store import RedisStore
from prefix_registry.store import PrefixStore
from tests.corrupt_records import ALL, Corruption, Place
from tests.registry.conftest import MakeArtifact

KEY_HASH = "ab" * 32
OTHER_HASH = "cd" * 32


@pytest.fixture
async def opened(request: pytest.FixtureRequest, tmp_path: Path,
                 make_artifact: MakeArtifact) -> AsyncIterator[tuple[PrefixStore, Place]]:
    """A store holding tenant `acme` with prefixes `style` (to corrupt) and `other`, and two
    keys; the corruption named by the test's parameter is written into it."""
    corruption: Corruption = request.param
    store: PrefixStore
    client = None
    if corruption.store == "redis":
        url, ns = request.getfixturevalue("redis_url"), request.getfixturevalue("namespace")
        store = RedisStore(url, namespace=ns)
        client = redis.Redis.from_url(url)
    else:
        store = LocalStore(tmp_path / "registry")
    await store.create_tenant("acme")
    await store.add_key("acme", "k1", KEY_HASH, 1.0)
    await store.add_key("acme", "k2", OTHER_HASH, 2.0)
    good = await store.put(make_artifact("style", seed=1))
    await store.put(make_artifact("other", seed=2))
    stored = await store.get("acme", good.ref)
    place = Place("acme", "style", "k1", KEY_HASH, stored, client,
                  getattr(store, "keys", None), tmp_path / "registry")
    corruption.write(place)
    yield store, place
    await store.close()
    if client is not None:
        client.close()


def _cases(*kinds: str) -> list[object]:
    return [pytest.param(c, id=c.name) for c in ALL if c.kind in kinds]


@pytest.mark.parametrize("opened", _cases("prefix"), indirect=True)
async def test_a_corrupt_prefix_fails_its_own_reads_and_no_listing(
        opened: tuple[PrefixStore, Place]) -> None:
    store, _ = opened
    with pytest.raises(CorruptRecordError) as caught:
        await store.get("acme", "style")
    assert not isinstance(caught.value, InvalidPrefixError)
    assert caught.value.key  # named, and logged with it
    assert (await store.get("acme", "other")).meta.name == "other"  # the neighbour still reads
    page = await store.list("acme")  # a listing leaves a bad record out, never fails
    assert "other" in [m.name for m in page.items]
    try:  # the metadata may be intact (a Redis blob): then it is listed; else refused as corrupt
        meta = await store.get_meta("acme", "style")
        assert meta.prefix_len >= 1
    except CorruptRecordError:
        assert "style" not in [m.name for m in page.items]
    await store.versions("acme", "other")
    assert await store.delete("acme", "style") >= 1  # the operator can remove it
    with pytest.raises(PrefixNotFoundError):
        await store.get("acme", "style")


@pytest.mark.parametrize("opened", _cases("meta"), indirect=True)
async def test_a_corrupt_metadata_record_is_refused_and_left_out_of_listings(
        opened: tuple[PrefixStore, Place]) -> None:
    store, _ = opened
    with pytest.raises(CorruptRecordError):
        await store.get_meta("acme", "style")
    with pytest.raises(CorruptRecordError):  # its only version is bad: not "not found"
        await store.versions("acme", "style")
    assert [m.name for m in (await store.list("acme")).items] == ["other"]
    assert (await store.get("acme", "style")).meta.prefix_len >= 1  # the blob is checked apart


@pytest.mark.parametrize("opened", _cases("counter"), indirect=True)
async def test_a_corrupt_version_counter_refuses_that_name_s_uploads_only(
        opened: tuple[PrefixStore, Place], make_artifact: MakeArtifact) -> None:
    store, _ = opened
    with pytest.raises(CorruptRecordError):
        await store.put(make_artifact("style", seed=7))
    assert (await store.get("acme", "style@1")).meta.version == 1
    assert (await store.put(make_artifact("other", seed=7))).version == 2


@pytest.mark.parametrize("opened", _cases("stored_bytes"), indirect=True)
async def test_a_corrupt_stored_bytes_counter_is_computed_again(
        opened: tuple[PrefixStore, Place], make_artifact: MakeArtifact) -> None:
    store, place = opened
    before = place.good.meta.size_bytes * 2
    limits = StorageLimits(max_prefixes=10, max_stored_bytes=10 * before)
    assert (await store.put(make_artifact("third", seed=3), limits=limits)).version == 1
    assert (await store.usage("acme")).stored_bytes == before + place.good.meta.size_bytes


@pytest.mark.parametrize("opened", _cases("tenant"), indirect=True)
async def test_a_corrupt_tenant_record_is_left_out_of_the_listing(
        opened: tuple[PrefixStore, Place], make_artifact: MakeArtifact) -> None:
    store, _ = opened
    await store.create_tenant("beta")
    assert [t.name for t in await store.list_tenants()] == ["beta"]
    assert await store.tenant_exists("acme")  # its prefixes and keys go on working
    assert await store.tenant_for_key_hash(KEY_HASH) == "acme"
    assert (await store.get("acme", "style")).meta.name == "style"


@pytest.mark.parametrize("opened", _cases("key_hash"), indirect=True)
async def test_a_corrupt_key_hash_record_fails_that_key_only(
        opened: tuple[PrefixStore, Place]) -> None:
    store, _ = opened
    with pytest.raises(CorruptRecordError) as caught:
        await store.tenant_for_key_hash(KEY_HASH)
    assert KEY_HASH not in caught.value.message  # a key's hash is not written out whole
    assert await store.tenant_for_key_hash(OTHER_HASH) == "acme"


@pytest.mark.parametrize("opened", _cases("key_record"), indirect=True)
async def test_a_corrupt_key_record_is_left_out_and_still_revoked(
        opened: tuple[PrefixStore, Place]) -> None:
    store, _ = opened
    assert [k.key_id for k in await store.list_keys("acme")] == ["k2"]
    revoked: list[list[str]] = []
    await store.subscribe(lambda t, n: None, on_revoked=revoked.append)
    await store.revoke_key("acme", "k1")  # its hash is found by its key-hash record
    assert await store.tenant_for_key_hash(KEY_HASH) is None
    deletion = await store.delete_tenant("acme")
    assert deletion.keys == 1 and await store.tenant_for_key_hash(OTHER_HASH) is None
    for _ in range(50):  # Redis announces over pub/sub
        if [KEY_HASH] in revoked:
            break
        await asyncio.sleep(0.05)
    assert [KEY_HASH] in revoked


@pytest.mark.parametrize("opened", [pytest.param(c, id=c.name) for c in ALL
                                    if c.name.endswith("key_record_garbage")], indirect=True)
async def test_deleting_a_tenant_revokes_a_key_whose_record_is_corrupt(
        opened: tuple[PrefixStore, Place]) -> None:
    store, _ = opened
    deletion = await store.delete_tenant("acme")
    assert deletion.keys == 2
    assert await store.tenant_for_key_hash(KEY_HASH) is None


@pytest.mark.parametrize("opened", _cases("quota"), indirect=True)
async def test_a_quota_record_that_is_not_json_counts_as_not_set(
        opened: tuple[PrefixStore, Place]) -> None:
    store, _ = opened
    assert (await store.get_quota("acme")).tokens_per_minute is None
    assert (await store.get("acme", "style")).meta.name == "style"


# ---- idempotent uploads ----------------------------------------------------------------------

async def test_a_retried_upload_answers_with_the_version_it_made(
        store: PrefixStore, make_artifact: MakeArtifact) -> None:
    await store.create_tenant("acme")
    first = await store.put(make_artifact("style", seed=1))
    again = await store.put(make_artifact("style", seed=1))
    assert again == first  # same version, same created_at: nothing new was stored
    assert [m.version for m in await store.versions("acme", "style")] == [1]
    limits = StorageLimits(max_prefixes=1, max_stored_bytes=first.size_bytes)
    assert await store.put(make_artifact("style", seed=1), limits=limits) == first  # no room needed


async def test_a_different_upload_or_a_rollback_makes_a_new_version(
        store: PrefixStore, make_artifact: MakeArtifact) -> None:
    await store.create_tenant("acme")
    await store.put(make_artifact("style", seed=1))
    described = await store.put(make_artifact("style", seed=1, description="v2"))
    assert described.version == 2  # same tensors, other description: another upload
    assert (await store.put(make_artifact("style", seed=2))).version == 3
    rollback = await store.put(make_artifact("style", seed=1))  # not the newest: stored again
    assert rollback.version == 4


async def test_an_upload_answered_503_after_it_landed_is_answered_with_its_version_on_retry(
        redis_url: str, namespace: str, make_artifact: MakeArtifact) -> None:
    """The write reaches Redis but its acknowledgement fails (here: a replica that never
    confirms, as in a failover; a reply lost to a timeout is the same): the client sees 503
    registry_unavailable and retries. The retry stores nothing new and answers the version the
    first attempt made."""
    plain = RedisStore(redis_url, namespace=namespace)
    unconfirmed = RedisStore(redis_url, namespace=namespace,
                             options=RedisOptions(write_replicas=1, write_timeout_s=0.01))
    try:
        await plain.create_tenant("acme")
        for _ in range(3):  # each attempt lands, and is reported as failed
            with pytest.raises(RegistryUnavailableError, match="reached the primary"):
                await unconfirmed.put(make_artifact("style", seed=1))
        retried = await plain.put(make_artifact("style", seed=1))
        assert retried.version == 1
        assert [m.version for m in await plain.versions("acme", "style")] == [1]
        assert (await plain.usage("acme")).stored_bytes == retried.size_bytes
    finally:
        await plain.close()
        await unconfirmed.close()
