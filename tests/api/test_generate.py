"""POST /generate against the real app: outputs equal an independent greedy reference (the
model's own forward, no engine), streamed deltas equal the whole text, prefixes and versions."""

from __future__ import annotations

import pytest

from server.models.loader import LoadedModel
from tests.api.conftest import Served
from tests.api.helpers import (
    auth,
    create_tenant,
    decode,
    parse_sse,
    prefix_tensors,
    reference_greedy,
    safetensors_file,
    upload,
)

PROMPT = "hello world"
N = 8


async def generate(served: Served, key: str, **body: object) -> dict:
    response = await served.client.post("/generate", headers=auth(key),
                                        json={"prompt": PROMPT, "max_new_tokens": N, **body})
    assert response.status_code == 200, response.text
    return dict(response.json())


async def test_base_model_matches_reference(server: Served, loaded: LoadedModel) -> None:
    key = await create_tenant(server.client, "acme")
    out = await generate(server, key)
    expected = reference_greedy(loaded, PROMPT, N)
    assert out["text"] == decode(loaded, expected)
    assert out["finish_reason"] == ("length" if len(expected) == N else "stop")
    prompt_tokens = len(loaded.tokenizer(PROMPT)["input_ids"])
    assert out["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": len(expected),
                            "prefix_tokens": 0}
    assert out["prefix"] is None and out["id"].startswith("req-")
    assert set(out["timings"]) == {"queue_s", "ttft_s", "total_s"}


@pytest.mark.parametrize("form", ["kv", "p_theta"])
async def test_prefix_output_matches_reference(server: Served, loaded: LoadedModel,
                                               form: str) -> None:
    key = await create_tenant(server.client, "acme")
    tensors = prefix_tensors(loaded, form, prefix_len=5, seed=1)
    files = {"p.safetensors": safetensors_file(tensors)}
    response = await upload(server.client, key, "style", files)
    assert response.status_code == 201, response.text
    out = await generate(server, key, prefix_id="style")
    expected = reference_greedy(loaded, PROMPT, N, tensors)
    assert expected != reference_greedy(loaded, PROMPT, N)  # the prefix changes the output
    assert out["text"] == decode(loaded, expected)
    assert out["prefix"] == {"id": "style", "version": 1}
    assert out["usage"]["prefix_tokens"] == 5


async def test_stream_deltas_concatenate_to_the_whole_text(server: Served,
                                                           loaded: LoadedModel) -> None:
    key = await create_tenant(server.client, "acme")
    tensors = prefix_tensors(loaded, "kv", seed=2)
    await upload(server.client, key, "style", {"p.safetensors": safetensors_file(tensors)})
    whole = await generate(server, key, prefix_id="style")
    response = await server.client.post(
        "/generate", headers=auth(key),
        json={"prompt": PROMPT, "max_new_tokens": N, "prefix_id": "style", "stream": True})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(response.text)
    names = [name for name, _ in events]
    assert names[-1] == "done" and names.count("done") == 1
    assert set(names[:-1]) <= {"delta"} and len(names) > 1
    assert "".join(data["text"] for name, data in events if name == "delta") == whole["text"]
    done = events[-1][1]
    assert "text" not in done
    assert {k: done[k] for k in ("finish_reason", "usage", "prefix")} == {
        k: whole[k] for k in ("finish_reason", "usage", "prefix")}


async def test_versions_and_cache_invalidation(server: Served, loaded: LoadedModel) -> None:
    """`name` follows a new upload at once (the cached v1 is dropped); `name@1` stays v1."""
    key = await create_tenant(server.client, "acme")
    v1, v2 = prefix_tensors(loaded, seed=3), prefix_tensors(loaded, seed=4)
    await upload(server.client, key, "style", {"a.safetensors": safetensors_file(v1)})
    first = await generate(server, key, prefix_id="style")
    assert first["prefix"]["version"] == 1
    await upload(server.client, key, "style", {"a.safetensors": safetensors_file(v2)})
    latest = await generate(server, key, prefix_id="style")
    pinned = await generate(server, key, prefix_id="style@1")
    assert latest["prefix"] == {"id": "style", "version": 2}
    assert latest["text"] == decode(loaded, reference_greedy(loaded, PROMPT, N, v2))
    assert pinned["prefix"] == {"id": "style", "version": 1}
    assert pinned["text"] == first["text"]


async def test_stop_string_cuts_the_output(server: Served, loaded: LoadedModel) -> None:
    key = await create_tenant(server.client, "acme")
    full = decode(loaded, reference_greedy(loaded, PROMPT, N))
    stop = full[3:5]
    assert stop and full.find(stop) >= 1
    out = await generate(server, key, stop=[stop])
    assert out["text"] == full[: full.find(stop)]
    assert out["finish_reason"] == "stop"


async def test_seeded_sampling_is_reproducible(server: Served) -> None:
    key = await create_tenant(server.client, "acme")
    body = {"temperature": 1.0, "top_p": 0.9, "top_k": 50, "seed": 1234}
    first, second = await generate(server, key, **body), await generate(server, key, **body)
    assert first["text"] == second["text"]


async def test_a_vanishing_temperature_is_greedy_and_the_engine_survives(
    server: Served, loaded: LoadedModel
) -> None:
    key = await create_tenant(server.client, "acme")
    out = await generate(server, key, temperature=2.5e-234, top_p=0.01)
    assert out["text"] == decode(loaded, reference_greedy(loaded, PROMPT, N))
    ready = await server.client.get("/ready")
    assert ready.status_code == 200, ready.text


async def test_request_id_is_accepted_and_returned(server: Served) -> None:
    key = await create_tenant(server.client, "acme")
    response = await server.client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 1},
                                        headers={**auth(key), "X-Request-ID": "client-id-42"})
    assert response.headers["x-request-id"] == "client-id-42"
    fresh = await server.client.get("/health")
    assert fresh.headers["x-request-id"].startswith("req-")
