"""A corrupted record in the registry fails only the request that reads it, with
`500 corrupt_record` (the server's data, never a 422 blaming the caller), and never a listing,
another prefix, another key or the engine. Each corruption of `tests/corrupt_records.py` is
written into the real store (Redis, or the local directory) under a running app."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from server.models.loader import LoadedModel
from tests.api.conftest import SettingsFactory, serve
from tests.api.helpers import ADMIN_KEY, auth, prefix_tensors, safetensors_file, upload
from tests.corrupt_records import ALL, Corruption, Place
from tests.redis_ns import REDIS_URL

ADMIN = auth(ADMIN_KEY)


@dataclass
class Setup:
    client: httpx.AsyncClient
    key1: str  # the key whose records the corruption may hit
    key_id: str  # key1's id
    key2: str  # another key of the same tenant

    async def generate(self, prefix: str | None, key: str | None = None) -> httpx.Response:
        body = {"prompt": "hello there", "max_new_tokens": 3, "prefix_id": prefix}
        return await self.client.post("/generate", headers=auth(key or self.key2), json=body)


@pytest.fixture
async def corrupted(request: pytest.FixtureRequest, make_settings: SettingsFactory,
                    loaded: LoadedModel, tmp_path: Path) -> AsyncIterator[Setup]:
    corruption: Corruption = request.param
    redis_url = REDIS_URL if corruption.store == "redis" else None
    async with serve(make_settings(redis_url=redis_url), loaded) as served:
        client = served.client
        created = await client.post("/admin/tenants", headers=ADMIN, json={"name": "acme"})
        key1, key_id = created.json()["api_key"], created.json()["key_id"]
        key2 = (await client.post("/admin/tenants/acme/keys", headers=ADMIN)).json()["api_key"]
        for name, seed in (("style", 1), ("other", 2)):
            data = safetensors_file(prefix_tensors(loaded, seed=seed))
            assert (await upload(client, key2, name, {"p.safetensors": data})).status_code == 201
        store = served.services.store
        good = await store.get("acme", "style@1")  # straight from the store: nothing cached
        sync = redis.Redis.from_url(REDIS_URL) if redis_url else None
        place = Place("acme", "style", key_id, hashlib.sha256(key1.encode()).hexdigest(), good,
                      sync, getattr(store, "keys", None), getattr(store, "directory", None))
        corruption.write(place)
        yield Setup(client, key1, key_id, key2)
        if sync is not None:
            sync.close()
        assert (await served.client.get("/health")).status_code == 200  # the engine lived


def _cases(*kinds: str) -> list[object]:
    return [pytest.param(c, id=c.name) for c in ALL if c.kind in kinds]


def _corrupt_record(response: httpx.Response) -> bool:
    return response.status_code == 500 and response.json()["error"]["type"] == "corrupt_record"


@pytest.mark.parametrize("corrupted", _cases("prefix"), indirect=True)
async def test_a_corrupt_prefix_fails_its_requests_only(corrupted: Setup) -> None:
    c = corrupted
    assert _corrupt_record(await c.generate("style"))
    pinned = await c.generate("style@1")  # the version index alone may be what is bad
    assert pinned.status_code == 200 or _corrupt_record(pinned)
    chat = {"model": "style", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert _corrupt_record(await c.client.post("/v1/chat/completions", headers=auth(c.key2),
                                               json=chat))
    assert (await c.generate("other")).status_code == 200
    assert (await c.generate(None)).status_code == 200
    for path in ("/admin/prefixes", "/v1/models"):
        listed = await c.client.get(path, headers=auth(c.key2))
        assert listed.status_code == 200 and "other" in listed.text
    for path in ("/v1/models/style", "/admin/prefixes/style"):  # its metadata may be intact
        one = await c.client.get(path, headers=auth(c.key2))
        assert one.status_code == 200 or _corrupt_record(one), one.text
    deleted = await c.client.delete("/admin/prefixes/style", headers=auth(c.key2))
    assert deleted.status_code == 200  # the tenant can remove it and upload again


@pytest.mark.parametrize("corrupted", _cases("meta"), indirect=True)
async def test_a_corrupt_metadata_record_is_left_out_of_listings(corrupted: Setup) -> None:
    c = corrupted
    for path in ("/admin/prefixes", "/v1/models"):
        listed = await c.client.get(path, headers=auth(c.key2))
        assert listed.status_code == 200 and "other" in listed.text and "style" not in listed.text
    for path in ("/v1/models/style", "/admin/prefixes/style"):
        assert _corrupt_record(await c.client.get(path, headers=auth(c.key2)))
    assert (await c.generate("other")).status_code == 200


@pytest.mark.parametrize("corrupted", _cases("counter"), indirect=True)
async def test_a_corrupt_version_counter_refuses_that_name_s_uploads(
        corrupted: Setup, loaded: LoadedModel) -> None:
    c = corrupted
    data = {"p.safetensors": safetensors_file(prefix_tensors(loaded, seed=9))}
    assert _corrupt_record(await upload(c.client, c.key2, "style", data))
    assert (await upload(c.client, c.key2, "other", data)).status_code == 201
    assert (await c.generate("style@1")).status_code == 200


@pytest.mark.parametrize("corrupted", _cases("stored_bytes"), indirect=True)
async def test_a_corrupt_stored_bytes_counter_does_not_stop_uploads(
        corrupted: Setup, loaded: LoadedModel) -> None:
    c = corrupted
    quota = {"max_stored_bytes": 10**6, "max_prefixes": 10}
    assert (await c.client.patch("/admin/tenants/acme/quota", headers=ADMIN,
                                 json=quota)).status_code == 200
    data = {"p.safetensors": safetensors_file(prefix_tensors(loaded, seed=9))}
    assert (await upload(c.client, c.key2, "third", data)).status_code == 201


@pytest.mark.parametrize("corrupted", _cases("tenant"), indirect=True)
async def test_a_corrupt_tenant_record_is_left_out_of_the_tenant_list(corrupted: Setup) -> None:
    c = corrupted
    await c.client.post("/admin/tenants", headers=ADMIN, json={"name": "beta"})
    listed = await c.client.get("/admin/tenants", headers=ADMIN)
    assert listed.status_code == 200 and "beta" in listed.text and "acme" not in listed.text
    assert (await c.generate("style")).status_code == 200  # the tenant itself goes on


@pytest.mark.parametrize("corrupted", _cases("key_hash"), indirect=True)
async def test_a_corrupt_key_hash_record_fails_that_key_only(corrupted: Setup) -> None:
    c = corrupted
    assert _corrupt_record(await c.generate("style", key=c.key1))
    assert (await c.generate("style", key=c.key2)).status_code == 200


@pytest.mark.parametrize("corrupted", _cases("key_record"), indirect=True)
async def test_a_key_with_a_corrupt_record_is_left_out_of_the_list_and_still_revoked(
        corrupted: Setup) -> None:
    c = corrupted
    listed = await c.client.get("/admin/tenants", headers=ADMIN)
    assert listed.status_code == 200
    [acme] = listed.json()["items"]
    assert [k["key_id"] for k in acme["keys"]] != [] and c.key_id not in listed.text
    assert (await c.generate("style", key=c.key1)).status_code == 200
    revoked = await c.client.delete(f"/admin/tenants/acme/keys/{c.key_id}", headers=ADMIN)
    assert revoked.status_code == 200, revoked.text
    assert (await c.generate("style", key=c.key1)).status_code == 401
    assert (await c.generate("style", key=c.key2)).status_code == 200


@pytest.mark.parametrize("corrupted", _cases("quota"), indirect=True)
async def test_a_quota_record_that_is_not_json_does_not_stop_the_tenant(corrupted: Setup) -> None:
    c = corrupted
    assert (await c.generate("style")).status_code == 200
    assert (await c.client.get("/admin/tenants/acme/quota", headers=ADMIN)).status_code == 200


async def test_a_retried_upload_is_answered_with_the_version_it_made(
        make_settings: SettingsFactory, loaded: LoadedModel) -> None:
    async with serve(make_settings(), loaded) as served:
        c = served.client
        key = (await c.post("/admin/tenants", headers=ADMIN, json={"name": "acme"})).json()
        data = {"p.safetensors": safetensors_file(prefix_tensors(loaded, seed=1))}
        first = await upload(c, key["api_key"], "style", data, description="d")
        again = await upload(c, key["api_key"], "style", data, description="d")
        assert first.status_code == again.status_code == 201
        assert again.json() == first.json()  # the same version, the same body
        detail = await c.get("/admin/prefixes/style", headers=auth(key["api_key"]))
        assert [v["version"] for v in detail.json()["versions"]] == [1]
