"""Tenant quotas from the SDK (blocking and async) and `prefixctl tenant quota`, against the real
server: show and set fields, clear them, and the errors a quota produces arrive as SDK classes."""

from __future__ import annotations

import json

import pytest

import clients
from clients.cli import EXIT_API_ERROR, EXIT_OK, EXIT_USAGE
from server.models.loader import LoadedModel
from tests.api.helpers import prefix_tensors
from tests.clients.conftest import ADMIN_KEY, LiveServer, ServerFactory
from tests.clients.test_cli import Ctl, ctl  # noqa: F401 - the fixture


def test_show_and_set_quotas(start_server: ServerFactory, loaded: LoadedModel) -> None:
    server = start_server(tenant_max_prefixes=10)
    with clients.PrefixClient(server.url, ADMIN_KEY) as admin:
        key = admin.create_tenant("acme").api_key
        quota = admin.get_quota("acme")
        assert quota.name == "acme" and quota.overrides == {}
        assert quota.quota == clients.QuotaValues(max_prefixes=10)  # the server's default
        assert quota.usage == clients.StorageUsage(prefixes=0, stored_bytes=0)
        changed = admin.set_quota("acme", weight=2, max_running=3, tokens_per_minute=10**6)
        assert changed.overrides == {"weight": 2.0, "max_running": 3, "tokens_per_minute": 10**6}
        assert [type(changed.overrides[f]) for f in ("max_running", "tokens_per_minute")] == \
            [int, int]  # shown as 3, not 3.0
        assert changed.quota.weight == 2.0 and changed.quota.max_prefixes == 10
        cleared = admin.set_quota("acme", max_running=None)  # back to the default
        assert "max_running" not in cleared.overrides and cleared.quota.max_running is None
        assert cleared.quota.weight == 2.0  # fields left out are unchanged
        with pytest.raises(clients.UnprocessableEntityError):
            admin.set_quota("acme", weight=0)
        with pytest.raises(clients.NotFoundError):
            admin.get_quota("ghost")
    with clients.PrefixClient(server.url, key) as tenant:
        assert tenant.get_quota("acme").quota.weight == 2.0  # a tenant reads its own
        with pytest.raises(clients.PermissionDeniedError):
            tenant.set_quota("acme", weight=100)
        tenant.upload_prefix("a", prefix_tensors(loaded))
        assert tenant.get_quota("acme").usage == clients.StorageUsage(
            prefixes=1, stored_bytes=tenant.get_prefix("a").size_bytes)


def test_quota_errors_arrive_as_sdk_classes(server: LiveServer, loaded: LoadedModel) -> None:
    with clients.PrefixClient(server.url, ADMIN_KEY) as admin:
        key = admin.create_tenant("acme").api_key
        admin.set_quota("acme", max_prefixes=1, tokens_per_minute=1)
    with clients.PrefixClient(server.url, key, max_retries=0) as tenant:
        tenant.upload_prefix("a", prefix_tensors(loaded))
        with pytest.raises(clients.QuotaExceededError) as refused:
            tenant.upload_prefix("b", prefix_tensors(loaded))
        assert isinstance(refused.value, clients.PermissionDeniedError)
        assert refused.value.type == "quota_exceeded" and "at most 1 prefixes" in str(refused.value)
        tenant.generate(None, "hello world", max_new_tokens=2)  # uses more than its 1 token
        with pytest.raises(clients.RateLimitError) as limited:
            tenant.generate(None, "hello world", max_new_tokens=2)
        assert limited.value.type == "rate_limited" and limited.value.retry_after
        assert limited.value.retry_after >= 1


async def test_async_client_shows_and_sets_quotas(server: LiveServer) -> None:
    async with clients.AsyncPrefixClient(server.url, ADMIN_KEY) as admin:
        await admin.create_tenant("acme")
        changed = await admin.set_quota("acme", max_queued=4, max_stored_bytes=2**20)
        assert changed.overrides == {"max_queued": 4, "max_stored_bytes": 2**20}
        assert (await admin.get_quota("acme")).quota.max_queued == 4
        cleared = await admin.set_quota("acme", max_queued=None, max_stored_bytes=None)
        assert cleared.overrides == {}
        with pytest.raises(clients.NotFoundError):
            await admin.set_quota("ghost", weight=2)


def test_prefixctl_tenant_quota(ctl: Ctl) -> None:  # noqa: F811 - the fixture
    ctl("tenant", "create", "acme")
    code, out, err = ctl("tenant", "quota", "set", "acme", "--weight", "2", "--max-queued", "8",
                         "--max-stored-bytes", "64MiB")
    assert code == EXIT_OK, err
    lines = out.splitlines()
    assert lines[0] == "tenant acme" and lines[1].split() == ["FIELD", "VALUE", "SET", "BY"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:8]}
    assert rows["weight"] == ["2", "tenant"] and rows["max_queued"] == ["8", "tenant"]
    assert rows["max_stored_bytes"] == ["64.0", "MiB", "tenant"]
    assert rows["max_running"] == ["no", "limit", "default"]
    assert lines[-1] == "stored: 0 prefixes, 0 B"
    code, out, _ = ctl("tenant", "quota", "set", "acme", "--max-queued", "default", "--json")
    body = json.loads(out)
    assert code == EXIT_OK and body["overrides"] == {"weight": 2.0, "max_stored_bytes": 2**26}
    assert type(body["overrides"]["max_stored_bytes"]) is int  # printed 67108864, not ...0
    code, out, _ = ctl("tenant", "quota", "show", "acme", "--json")
    assert json.loads(out)["quota"]["max_queued"] is None
    assert ctl("tenant", "quota", "set", "acme")[0] == EXIT_USAGE  # nothing to set
    assert ctl("tenant", "quota", "set", "acme", "--max-running", "lots")[0] == EXIT_USAGE
    assert ctl("tenant", "quota", "set", "acme", "--max-stored-bytes", "3 parsecs")[0] == \
        EXIT_USAGE
    code, out, err = ctl("tenant", "quota", "set", "acme", "--weight", "0")
    assert (code, out) == (EXIT_API_ERROR, "") and err.startswith("error: validation_error: ")
    code, _, err = ctl("tenant", "quota", "show", "ghost")
    assert code == EXIT_API_ERROR and err.startswith("error: not_found: ")
