"""Hostile request bodies and files over the real app: each is a 4xx in the one error format,
never a 500, and the engine keeps serving."""

from __future__ import annotations

import json
import struct

import pytest
import safetensors.torch
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

DEEP = "[" * 100_000 + "]" * 100_000
LONE = "\\ud800"  # a lone surrogate, as JSON escapes it


async def _post_raw(served: Served, path: str, body: str) -> int:
    response = await served.client.post(
        path, content=body.encode(), headers={**auth(ADMIN_KEY),
                                              "Content-Type": "application/json"})
    assert set(response.json()) == {"error"}, response.text
    return response.status_code


@pytest.mark.parametrize(("path", "body"), [
    ("/generate", '{"prompt": "@"}'),
    ("/generate", '{"prompt": "hi", "stop": ["@"]}'),
    ("/v1/completions", '{"model": "M", "prompt": "@"}'),
    ("/v1/completions", '{"model": "M", "prompt": ["@"]}'),
    ("/v1/chat/completions", '{"model": "M", "messages": [{"role": "user", "content": "@"}]}'),
    ("/v1/chat/completions", '{"model": "M", "messages": [{"role": "user", "content": '
     '[{"type": "text", "text": "@"}]}]}'),
], ids=["generate", "stop", "completion", "completion-list", "chat", "chat-part"])
async def test_lone_surrogates_are_a_4xx(server: Served, loaded: LoadedModel, path: str,
                                         body: str) -> None:
    body = body.replace('"M"', json.dumps(loaded.name)).replace('"@"', f'"{LONE}"')
    status = await _post_raw(server, path, body)
    assert 400 <= status < 500
    assert (await server.client.get("/ready")).status_code == 200


def _with_metadata(loaded: LoadedModel, value: object) -> bytes:
    data = safetensors.torch.save(prefix_tensors(loaded, "kv"))
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"] = {"prefix-serve": value}
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


@pytest.mark.parametrize("value", ['"5"', 5, DEEP], ids=["string", "number", "deep"])
async def test_bad_artifact_metadata_is_a_422(server: Served, loaded: LoadedModel,
                                              value: object) -> None:
    response = await upload(server.client, ADMIN_KEY, "p",
                            {"p.safetensors": _with_metadata(loaded, value)})
    assert response.status_code == 422, response.text


async def test_a_deep_safetensors_header_and_adapter_config_are_a_422(server: Served) -> None:
    raw = ('{"a": ' + DEEP + "}").encode()
    header = await upload(server.client, ADMIN_KEY, "p",
                          {"p.safetensors": struct.pack("<Q", len(raw)) + raw})
    assert header.status_code == 422, header.text
    config = ('{"peft_type": "PREFIX_TUNING", "x": ' + DEEP + "}").encode()
    weights = safetensors.torch.save({"prompt_embeddings": torch.zeros(2, 4)})
    adapter = await upload(server.client, ADMIN_KEY, "p", {
        "adapter_config.json": config, "adapter_model.safetensors": weights})
    assert adapter.status_code == 422, adapter.text


async def test_a_prefix_that_can_never_fit_the_context_is_refused(server: Served,
                                                                  loaded: LoadedModel) -> None:
    context = loaded.max_context  # 256 for the tiny model; the registry allows 512
    files = {"p.safetensors": safetensors_file(prefix_tensors(loaded, prefix_len=context - 1))}
    response = await upload(server.client, ADMIN_KEY, "long", files)
    assert response.status_code == 422, response.text
    assert "context" in response.json()["error"]["message"]
    fits = {"p.safetensors": safetensors_file(prefix_tensors(loaded, prefix_len=context - 2))}
    key = await create_tenant(server.client, "acme")
    assert (await upload(server.client, key, "fits", fits)).status_code == 201


@pytest.mark.parametrize("form", ["p_theta", "kv"])
async def test_a_prefix_whose_model_outputs_are_not_finite_is_refused(
    server: Served, loaded: LoadedModel, form: str
) -> None:
    tensors = {k: torch.full_like(v, 3e38) for k, v in prefix_tensors(loaded, form).items()}
    response = await upload(server.client, ADMIN_KEY, "huge", {"p.safetensors":
                                                                safetensors_file(tensors)})
    assert response.status_code == 422, response.text
    assert "finite" in response.json()["error"]["message"]


async def test_client_input_is_echoed_only_as_a_short_escaped_excerpt(server: Served) -> None:
    long_tenant = "t" * 10_000
    response = await server.client.post("/generate", json={"prompt": "hi"},
                                        headers={**auth(ADMIN_KEY), "X-Tenant": long_tenant})
    assert response.status_code == 404
    message = response.json()["error"]["message"]
    assert len(message) < 200 and "t" * 100 not in message
    for path in (f"/admin/tenants/{long_tenant}/keys", f"/admin/prefixes/{'p' * 5000}"):
        response = await server.client.get(path, headers=auth(ADMIN_KEY))
        response = response if path.startswith("/admin/prefixes") else \
            await server.client.post(path, headers=auth(ADMIN_KEY))
        assert 400 <= response.status_code < 500
        assert len(response.json()["error"]["message"]) < 300, response.text
    escaped = await server.client.post("/generate", json={"prompt": "hi"},
                                       headers={**auth(ADMIN_KEY), "X-Tenant": "a\x1b[31mb"})
    assert "\x1b" not in escaped.json()["error"]["message"]


async def test_an_upload_for_a_missing_tenant_is_no_metrics_label(server: Served,
                                                                   loaded: LoadedModel) -> None:
    files = {"p.safetensors": safetensors_file(prefix_tensors(loaded))}
    response = await upload(server.client, ADMIN_KEY, "p", files, tenant="no-such-tenant-xyz")
    assert response.status_code == 404, response.text
    metrics = (await server.client.get("/metrics", headers=auth(ADMIN_KEY))).text
    assert "no-such-tenant-xyz" not in metrics
