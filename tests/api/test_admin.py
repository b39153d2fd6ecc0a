"""Admin API: prefix upload/list/show/delete in every accepted format, tenants and keys,
tenant isolation, and the auth rules (401 / 403)."""

from __future__ import annotations

import io
import json
import tarfile

import httpx
import torch

from server.models.loader import LoadedModel
from tests.api.conftest import Served
from tests.api.helpers import (
    ADMIN_KEY,
    auth,
    create_tenant,
    prefix_tensors,
    safetensors_file,
    upload,
)


def peft_files(loaded: LoadedModel, prefix_len: int = 3) -> dict[str, bytes]:
    """A PEFT PREFIX_TUNING adapter: prompt_embeddings [T, L * 2 * H_kv * hd]."""
    fp = loaded.fingerprint
    config = {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM",
              "num_virtual_tokens": prefix_len, "num_layers": fp.num_layers,
              "token_dim": fp.num_kv_heads * fp.head_dim,
              "num_attention_heads": fp.num_kv_heads, "prefix_projection": False}
    flat = torch.randn(prefix_len, fp.num_layers * 2 * fp.num_kv_heads * fp.head_dim)
    return {"adapter_config.json": json.dumps(config).encode(),
            "adapter_model.safetensors": safetensors_file({"prompt_embeddings": flat})}


async def test_upload_list_show_delete(server: Served, loaded: LoadedModel) -> None:
    key = await create_tenant(server.client, "acme")
    c = server.client
    kv = safetensors_file(prefix_tensors(loaded, "kv", prefix_len=4))
    created = await upload(c, key, "formal", {"kv.safetensors": kv}, description="polite")
    assert created.status_code == 201, created.text
    info = created.json()
    assert (info["name"], info["version"], info["tenant"]) == ("formal", 1, "acme")
    assert info["form"] == "kv"
    assert info["prefix_len"] == 4 and info["description"] == "polite"
    assert info["model"]["digest"] == loaded.fingerprint.digest
    theta = safetensors_file(prefix_tensors(loaded, "p_theta", prefix_len=6))
    assert (await upload(c, key, "formal", {"t.safetensors": theta})).json()["version"] == 2
    assert (await upload(c, key, "peft", peft_files(loaded))).status_code == 201

    listing = (await c.get("/admin/prefixes?limit=1", headers=auth(key))).json()
    assert [p["name"] for p in listing["items"]] == ["formal"] and listing["next_cursor"]
    rest = (await c.get(f"/admin/prefixes?limit=1&cursor={listing['next_cursor']}",
                        headers=auth(key))).json()
    assert [p["name"] for p in rest["items"]] == ["peft"] and rest["next_cursor"] is None

    detail = (await c.get("/admin/prefixes/formal", headers=auth(key))).json()
    assert detail["version"] == 2 and detail["form"] == "p_theta"
    assert [v["version"] for v in detail["versions"]] == [2, 1]

    assert (await c.delete("/admin/prefixes/formal?version=2", headers=auth(key))).json() == {
        "deleted": 1}
    assert (await c.get("/admin/prefixes/formal", headers=auth(key))).json()["version"] == 1
    assert (await c.delete("/admin/prefixes/formal", headers=auth(key))).json() == {"deleted": 1}
    gone = await c.get("/admin/prefixes/formal", headers=auth(key))
    assert gone.status_code == 404 and gone.json()["error"]["type"] == "not_found"


async def test_upload_archive_of_a_peft_adapter(server: Served, loaded: LoadedModel) -> None:
    key = await create_tenant(server.client, "acme")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in peft_files(loaded).items():
            member = tarfile.TarInfo(f"adapter/{name}")
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    response = await upload(server.client, key, "packed", {"adapter.tar.gz": buffer.getvalue()})
    assert response.status_code == 201, response.text
    assert response.json()["form"] == "kv"


async def test_operator_acts_for_a_named_tenant(server: Served, loaded: LoadedModel) -> None:
    key = await create_tenant(server.client, "acme")
    kv = safetensors_file(prefix_tensors(loaded))
    made = await upload(server.client, ADMIN_KEY, "ops", {"p.safetensors": kv}, tenant="acme")
    assert made.status_code == 201 and made.json()["tenant"] == "acme"
    mine = (await server.client.get("/admin/prefixes", headers=auth(key))).json()
    assert [p["name"] for p in mine["items"]] == ["ops"]
    theirs = await server.client.get("/admin/prefixes?tenant=acme", headers=auth(ADMIN_KEY))
    assert [p["name"] for p in theirs.json()["items"]] == ["ops"]
    nobody = await server.client.get("/admin/prefixes?tenant=nobody", headers=auth(ADMIN_KEY))
    assert nobody.status_code == 404


async def test_tenant_isolation(server: Served, loaded: LoadedModel) -> None:
    """Another tenant's prefix answers exactly like a missing one, everywhere, even when the
    server has it warm in its resolver cache."""
    c = server.client
    a, b = await create_tenant(c, "alpha"), await create_tenant(c, "beta")
    before = await c.post("/generate", headers=auth(b),
                          json={"prompt": "hi", "prefix_id": "secret"})
    await upload(c, a, "secret", {"p.safetensors": safetensors_file(prefix_tensors(loaded))})
    warm = await c.post("/generate", headers=auth(a),  # alpha's "secret" is now cached
                        json={"prompt": "hi", "prefix_id": "secret", "max_new_tokens": 1})
    assert warm.status_code == 200, warm.text
    after = await c.post("/generate", headers=auth(b), json={"prompt": "hi", "prefix_id": "secret"})
    assert after.status_code == before.status_code == 404
    assert after.json() == before.json()
    for key, length in ((a, 3), (b, 5)):  # one name, two tenants: each gets its own, warm or not
        tensors = prefix_tensors(loaded, prefix_len=length)
        await upload(c, key, "shared", {"p.safetensors": safetensors_file(tensors)})
    for key, length in ((a, 3), (b, 5), (a, 3), (b, 5)):
        used = await c.post("/generate", headers=auth(key),
                            json={"prompt": "hi", "prefix_id": "shared", "max_new_tokens": 1})
        assert used.json()["usage"]["prefix_tokens"] == length, used.text
    shown = await c.get("/admin/prefixes/secret", headers=auth(b))
    missing = await c.get("/admin/prefixes/secret", headers=auth(await create_tenant(c, "gamma")))
    assert shown.status_code == 404 and shown.json() == missing.json()
    assert (await c.delete("/admin/prefixes/secret", headers=auth(b))).status_code == 404
    assert [p["name"] for p in (await c.get("/admin/prefixes", headers=auth(b))).json()["items"]
            ] == ["shared"]
    models = (await c.get("/v1/models", headers=auth(b))).json()["data"]
    assert "secret" not in [m["id"] for m in models] and "shared" in [m["id"] for m in models]
    assert (await c.get("/admin/prefixes/secret", headers=auth(a))).status_code == 200
    other = await c.get("/admin/prefixes?tenant=alpha", headers=auth(b))
    assert other.status_code == 403 and other.json()["error"]["type"] == "permission_denied"


async def test_tenants_and_keys(server: Served) -> None:
    c = server.client
    made = await c.post("/admin/tenants", headers=auth(ADMIN_KEY), json={"name": "acme"})
    assert made.status_code == 201
    first = made.json()
    assert first["name"] == "acme" and first["api_key"] and first["key_id"]
    again = await c.post("/admin/tenants", headers=auth(ADMIN_KEY), json={"name": "acme"})
    assert again.status_code == 409 and again.json()["error"]["type"] == "conflict"
    second = (await c.post("/admin/tenants/acme/keys", headers=auth(ADMIN_KEY))).json()
    listed = (await c.get("/admin/tenants", headers=auth(ADMIN_KEY))).json()["items"]
    assert listed == [{"name": "acme", "keys": [
        {"key_id": first["key_id"], "created_at": listed[0]["keys"][0]["created_at"]},
        {"key_id": second["key_id"], "created_at": listed[0]["keys"][1]["created_at"]}]}]
    assert first["api_key"] not in json.dumps(listed)
    revoked = await c.delete(f"/admin/tenants/acme/keys/{first['key_id']}",
                             headers=auth(ADMIN_KEY))
    assert revoked.json() == {"revoked": first["key_id"]}
    assert (await c.get("/v1/models", headers=auth(first["api_key"]))).status_code == 401
    assert (await c.get("/v1/models", headers=auth(second["api_key"]))).status_code == 200
    again_revoked = await c.delete(f"/admin/tenants/acme/keys/{first['key_id']}",
                                   headers=auth(ADMIN_KEY))
    assert again_revoked.status_code == 404
    no_tenant = await c.post("/admin/tenants/nobody/keys", headers=auth(ADMIN_KEY))
    assert no_tenant.status_code == 404


async def test_authentication_and_permissions(server: Served) -> None:
    c = server.client
    key = await create_tenant(c, "acme")

    def check(response: httpx.Response, status: int, error_type: str) -> None:
        assert response.status_code == status, response.text
        assert response.json() == {"error": {"type": error_type,
                                             "message": response.json()["error"]["message"]}}

    missing = await c.post("/generate", json={"prompt": "hi"})
    check(missing, 401, "authentication_error")
    assert missing.headers["www-authenticate"] == "Bearer"
    check(await c.post("/generate", json={"prompt": "hi"}, headers=auth("nope")),
          401, "authentication_error")
    check(await c.get("/admin/prefixes", headers={"Authorization": "Basic abc"}),
          401, "authentication_error")
    check(await c.get("/admin/tenants", headers=auth(key)), 403, "permission_denied")
    check(await c.post("/admin/tenants", headers=auth(key), json={"name": "evil"}),
          403, "permission_denied")
    check(await c.post("/generate", headers={**auth(key), "X-Tenant": "other"},
                       json={"prompt": "hi"}), 403, "permission_denied")
    check(await c.post("/generate", headers={**auth(ADMIN_KEY), "X-Tenant": "no-such-tenant"},
                       json={"prompt": "hi"}), 404, "not_found")
