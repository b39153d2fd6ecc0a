"""Builders and parsers for the API tests: prefix files, uploads, SSE, a reference decoder."""

from __future__ import annotations

import json
from typing import Any

import httpx
import safetensors.torch
import torch

from server.models.loader import LoadedModel
from server.models.prefix_kv import forward_with_prefix, prefix_kv

ADMIN_KEY = "test-operator-key"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def prefix_tensors(loaded: LoadedModel, form: str = "kv", prefix_len: int = 4,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """Random prefix tensors shaped for `loaded` (docs/architecture.md conventions)."""
    fp = loaded.fingerprint
    g = torch.Generator().manual_seed(seed)
    if form == "p_theta":  # [num_layers, prefix_len, d_model]
        return {"p_theta": torch.randn(fp.num_layers, prefix_len, fp.hidden_size, generator=g)}
    shape = (fp.num_layers, fp.num_kv_heads, prefix_len, fp.head_dim)  # each [L, H_kv, T, hd]
    return {"keys": 2 * torch.randn(shape, generator=g),
            "values": 2 * torch.randn(shape, generator=g)}


def safetensors_file(tensors: dict[str, torch.Tensor]) -> bytes:
    return safetensors.torch.save(tensors)


async def upload(client: httpx.AsyncClient, key: str, name: str, files: dict[str, bytes],
                 **fields: str) -> httpx.Response:
    parts = [("file", (fname, data, "application/octet-stream")) for fname, data in files.items()]
    return await client.post("/admin/prefixes", headers=auth(key), data={"name": name, **fields},
                             files=parts)


async def create_tenant(client: httpx.AsyncClient, name: str) -> str:
    """Create a tenant with the operator key; return its first API key."""
    response = await client.post("/admin/tenants", headers=auth(ADMIN_KEY), json={"name": name})
    assert response.status_code == 201, response.text
    return str(response.json()["api_key"])


def parse_sse(text: str) -> list[tuple[str, Any]]:
    """[(event name or 'message', parsed JSON data or raw string)] of an SSE body."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        name, data = "message", []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
        if data:
            raw = "\n".join(data)
            events.append((name, raw if raw == "[DONE]" else json.loads(raw)))
    return events


@torch.no_grad()
def reference_greedy(loaded: LoadedModel, prompt: str | list[int], max_new_tokens: int,
                     tensors: dict[str, torch.Tensor] | None = None) -> list[int]:
    """Greedy decoding by repeated full forwards through the model's own code (no engine)."""
    ids = loaded.tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else list(prompt)
    keys = values = None
    if tensors is not None:
        form = "p_theta" if "p_theta" in tensors else "kv"
        keys, values = prefix_kv(loaded, form, tensors)
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = forward_with_prefix(loaded, torch.tensor([ids + out]), None, keys, values)
        token = int(logits[0, -1].argmax())
        if token == loaded.tokenizer.eos_token_id:
            break
        out.append(token)
    return out


def decode(loaded: LoadedModel, ids: list[int]) -> str:
    return str(loaded.tokenizer.decode(ids, skip_special_tokens=True,
                                       clean_up_tokenization_spaces=False))
