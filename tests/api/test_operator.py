"""What an operator meets: a 404 that says how to name a tenant, and prefixes made for another
base model (shared registry) marked unusable in listings and left out of `/v1/models`."""

from __future__ import annotations

from prefix_registry.artifact import PrefixArtifact
from prefix_registry.fingerprint import ModelFingerprint
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

HINT = "the operator key acts for tenant 'default' unless a tenant is named"


async def test_operator_without_a_tenant_is_told_how_to_name_one(server: Served) -> None:
    c = server.client
    await create_tenant(c, "acme")
    listed = await c.get("/admin/prefixes", headers=auth(ADMIN_KEY))
    assert listed.status_code == 404
    message = listed.json()["error"]["message"]
    assert HINT in message and "?tenant=" in message and "prefixctl --tenant" in message
    generated = await c.post("/generate", headers=auth(ADMIN_KEY),
                             json={"prompt": "hi", "prefix_id": "style", "max_new_tokens": 2})
    assert generated.status_code == 404 and "X-Tenant" in generated.json()["error"]["message"]
    # Naming the tenant: the hint is gone, the answer is the tenant's.
    named = await c.get("/admin/prefixes", params={"tenant": "acme"}, headers=auth(ADMIN_KEY))
    assert named.status_code == 200 and named.json()["items"] == []
    missing = await c.post("/generate", headers={**auth(ADMIN_KEY), "X-Tenant": "acme"},
                           json={"prompt": "hi", "prefix_id": "style", "max_new_tokens": 2})
    assert missing.status_code == 404 and HINT not in missing.json()["error"]["message"]


async def test_a_tenant_key_gets_no_operator_hint(server: Served) -> None:
    key = await create_tenant(server.client, "acme")
    response = await server.client.get("/admin/prefixes/nope", headers=auth(key))
    assert response.status_code == 404 and HINT not in response.json()["error"]["message"]


async def test_prefixes_for_another_model_are_marked_unusable(
    server: Served, loaded: LoadedModel
) -> None:
    c = server.client
    key = await create_tenant(c, "acme")
    assert (await upload(c, key, "mine", {"p.safetensors": safetensors_file(
        prefix_tensors(loaded))})).status_code == 201
    # Another server on the same registry, with another model, stored this one.
    other = ModelFingerprint(**{**loaded.fingerprint.to_dict(), "digest": "0" * 64})
    await server.services.store.put(PrefixArtifact.create(
        name="alien", tenant="acme", model=other, tensors=prefix_tensors(loaded)))

    items = {i["name"]: i for i in (await c.get("/admin/prefixes", headers=auth(key))).json()[
        "items"]}
    assert items["mine"]["compatible"] is True and items["mine"]["incompatible_reason"] is None
    assert items["alien"]["compatible"] is False
    assert "different model" in items["alien"]["incompatible_reason"]
    shown = (await c.get("/admin/prefixes/alien", headers=auth(key))).json()
    assert shown["compatible"] is False and shown["versions"][0]["compatible"] is False

    models = [m["id"] for m in (await c.get("/v1/models", headers=auth(key))).json()["data"]]
    assert "mine" in models and "alien" not in models
    retrieved = await c.get("/v1/models/alien", headers=auth(key))
    assert retrieved.status_code == 422
    assert retrieved.json()["error"]["type"] == "incompatible_prefix"


async def test_retrieve_a_model(server: Served, loaded: LoadedModel) -> None:
    c = server.client
    key = await create_tenant(c, "acme")
    await upload(c, key, "style", {"p.safetensors": safetensors_file(prefix_tensors(loaded))})
    base = (await c.get(f"/v1/models/{server.services.model_name}", headers=auth(key))).json()
    assert base["id"] == server.services.model_name and base["object"] == "model"
    for ref in ("style", "style@1"):
        card = await c.get(f"/v1/models/{ref}", headers=auth(key))
        assert card.status_code == 200 and card.json()["id"] == ref
        assert card.json()["owned_by"] == "acme"
    for ref in ("nope", "style@9", "bad ref"):
        missing = await c.get(f"/v1/models/{ref}", headers=auth(key))
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found"
