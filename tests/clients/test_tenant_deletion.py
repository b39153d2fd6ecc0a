"""Deleting a tenant over the real server, in both stores: its keys stop working at once (even
with a long auth-cache TTL, through the in-memory key cache and the registry's announcements),
its prefixes are gone, and a tenant created again with the name starts empty. Through the sync
SDK, the async SDK and `prefixctl`."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest

import clients
from clients.cli import EXIT_OK, EXIT_USAGE, main
from server.models.loader import LoadedModel
from tests.clients.conftest import ADMIN_KEY, LiveServer, ServerFactory

STORES = ["redis", "local"]
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}  # /metrics needs the operator key


@pytest.fixture(params=STORES)
def server(request: pytest.FixtureRequest, start_server: ServerFactory,
           tmp_path: Path) -> LiveServer:
    local = dict(redis_url=None, data_dir=tmp_path / "store") if request.param == "local" else {}
    return start_server(auth_cache_ttl_s=3600.0, **local)


def _p_theta(loaded: LoadedModel) -> dict[str, np.ndarray]:
    fp = loaded.fingerprint
    return {"p_theta": np.zeros((fp.num_layers, 3, fp.hidden_size), dtype=np.float32)}


def test_delete_tenant_with_the_sdk(server: LiveServer, loaded: LoadedModel) -> None:
    with clients.PrefixClient(server.url, ADMIN_KEY) as admin:
        key = admin.create_tenant("acme").api_key
        second = admin.create_key("acme").api_key
        admin.create_tenant("beta")
        with clients.PrefixClient(server.url, key, max_retries=0) as acme:
            acme.upload_prefix("style", _p_theta(loaded))
            acme.upload_prefix("style", _p_theta(loaded), description="v2")  # a second version
            assert acme.generate("style", "hello", max_new_tokens=2).prefix is not None
            assert 'tenant="acme"' in httpx.get(f"{server.url}/metrics", headers=ADMIN).text
            deleted = admin.delete_tenant("acme")
            assert 'tenant="acme"' not in httpx.get(f"{server.url}/metrics", headers=ADMIN).text
            assert (deleted.name, deleted.keys, deleted.prefixes) == ("acme", 2, 2)
            for used in (key, second):  # at once, although the key cache would trust it 1 h
                with clients.PrefixClient(server.url, used, max_retries=0) as c, \
                        pytest.raises(clients.AuthenticationError):
                    c.generate("style", "hello", max_new_tokens=2)
        assert [t.name for t in admin.list_tenants()] == ["beta"]
        with pytest.raises(clients.NotFoundError):
            admin.delete_tenant("acme")
        fresh = admin.create_tenant("acme").api_key
        with clients.PrefixClient(server.url, fresh) as again:
            assert list(again.list_prefixes()) == []
            with pytest.raises(clients.NotFoundError):
                again.generate("style", "hello", max_new_tokens=2)


async def test_delete_tenant_with_the_async_sdk(server: LiveServer) -> None:
    async with clients.AsyncPrefixClient(server.url, ADMIN_KEY) as admin:
        key = (await admin.create_tenant("acme")).api_key
        async with clients.AsyncPrefixClient(server.url, key, max_retries=0) as acme:
            with pytest.raises(clients.PermissionDeniedError):
                await acme.delete_tenant("acme")  # a tenant key can't
            deleted = await admin.delete_tenant("acme")
            assert (deleted.keys, deleted.prefixes) == (1, 0)
            with pytest.raises(clients.AuthenticationError):
                await acme.list_prefixes().__anext__()


def test_delete_tenant_with_prefixctl(server: LiveServer,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--base-url", server.url, "--api-key", ADMIN_KEY]
    assert main([*base, "tenant", "create", "acme"]) == EXIT_OK
    capsys.readouterr()
    assert main([*base, "tenant", "delete", "acme"]) == EXIT_USAGE  # needs --yes
    assert "--yes" in capsys.readouterr().err
    assert main([*base, "--json", "tenant", "delete", "acme", "--yes"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out) == {"name": "acme", "keys": 1, "prefixes": 0}
    assert main([*base, "tenant", "delete", "acme", "--yes"]) != EXIT_OK
