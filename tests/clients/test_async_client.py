"""`AsyncPrefixClient` against the real server: the same methods as the blocking client, the
same results (checked against the independent greedy decoder), concurrency on one client."""

from __future__ import annotations

import asyncio

import httpx
import pytest

import clients
from server.models.loader import LoadedModel
from tests.api.helpers import decode, prefix_tensors, reference_greedy
from tests.clients.conftest import ADMIN_KEY, LiveServer

PROMPT = "hello world"


async def test_every_method(server: LiveServer, loaded: LoadedModel) -> None:
    async with clients.AsyncPrefixClient(server.url, ADMIN_KEY) as admin:
        assert (await admin.health()).status == "ok" and (await admin.ready()).ok
        key = await admin.create_tenant("acme")
        second = await admin.create_key("acme")
        tenants = await admin.list_tenants()
        assert {k.key_id for k in tenants[0].keys} == {key.key_id, second.key_id}
        assert await admin.revoke_key("acme", second.key_id) == second.key_id
    async with clients.AsyncPrefixClient(server.url, key.api_key) as client:
        tensors = prefix_tensors(loaded, "kv", prefix_len=3)
        for name in ("a", "b", "c"):
            info = await client.upload_prefix(name, tensors, description=f"prefix {name}")
            assert info.tenant == "acme" and info.description == f"prefix {name}"
        listed = [p.name async for p in client.list_prefixes(page_size=2)]
        assert sorted(listed) == ["a", "b", "c"]
        assert (await client.get_prefix("b")).versions[0].version == 1
        assert await client.delete_prefix("c") == 1
        with pytest.raises(clients.NotFoundError):
            await client.get_prefix("c")
        expected = decode(loaded, reference_greedy(loaded, PROMPT, 6, tensors))
        out = await client.generate("a", PROMPT, max_new_tokens=6)
        assert out.text == expected and out.prefix == clients.PrefixRef(id="a", version=1)
        async with await client.stream("a", PROMPT, max_new_tokens=6) as stream:
            deltas = [d async for d in stream]
        assert "".join(deltas) == stream.result.text == expected
        assert stream.result.usage == out.usage


async def test_concurrent_streams_on_one_client(server: LiveServer, loaded: LoadedModel) -> None:
    prompts = ["hello world", "the quick brown fox", "numbers 0 1 2"]
    async with clients.AsyncPrefixClient(server.url, ADMIN_KEY) as client:

        async def run(prompt: str) -> str:
            stream = await client.stream(None, prompt, max_new_tokens=5)
            result = await stream.until_done()
            return result.text

        texts = await asyncio.gather(*(run(p) for p in prompts))
    assert texts == [decode(loaded, reference_greedy(loaded, p, 5)) for p in prompts]


async def test_own_http_client_is_left_open(server: LiveServer) -> None:
    http = httpx.AsyncClient()
    async with clients.AsyncPrefixClient(server.url, http_client=http) as client:
        assert (await client.with_options(max_retries=0).health()).status == "ok"
    assert not http.is_closed
    await http.aclose()
    owned = clients.AsyncPrefixClient(server.url)
    await owned.health()
    await owned.close()
    assert owned._http.is_closed
