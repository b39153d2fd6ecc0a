"""OpenAI-compatible routes in-process: request mapping, defaults and the 400s for what is not
supported (the official client runs against uvicorn in test_live.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.models.loader import LoadedModel
from tests.api.conftest import Served
from tests.api.helpers import (
    ADMIN_KEY,
    auth,
    create_tenant,
    decode,
    parse_sse,
    reference_greedy,
)


async def test_completion_prompt_forms_and_defaults(server: Served, loaded: LoadedModel) -> None:
    key = await create_tenant(server.client, "acme")
    expected = decode(loaded, reference_greedy(loaded, "hello world", 5))
    for prompt in ("hello world", ["hello world"], loaded.tokenizer("hello world")["input_ids"]):
        response = await server.client.post("/v1/completions", headers=auth(key), json={
            "model": loaded.name, "prompt": prompt, "max_tokens": 5, "temperature": 0})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "text_completion" and body["model"] == loaded.name
        assert body["choices"][0]["text"] == expected
    default = await server.client.post("/v1/completions", headers=auth(key), json={
        "model": loaded.name, "prompt": "hello", "seed": 3})
    assert default.json()["usage"]["completion_tokens"] <= 16  # OpenAI's default max_tokens


@pytest.mark.parametrize("extra,named", [
    ({"n": 2}, "n"), ({"logprobs": 2}, "logprobs"), ({"echo": True}, "echo"),
    ({"best_of": 3}, "best_of"), ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"prompt": ["a", "b"], "n": 2}, "n"),
])
async def test_unsupported_options_are_400(server: Served, loaded: LoadedModel,
                                           extra: dict, named: str) -> None:
    key = await create_tenant(server.client, "acme")
    response = await server.client.post("/v1/completions", headers=auth(key), json={
        "model": loaded.name, "prompt": "hi", "max_tokens": 2, **extra})
    assert response.status_code == 400
    assert named in response.json()["error"]["message"]


async def test_chat_stream_shape(server: Served, loaded: LoadedModel) -> None:
    key = await create_tenant(server.client, "acme")
    response = await server.client.post("/v1/chat/completions", headers=auth(key), json={
        "model": loaded.name, "messages": [{"role": "system", "content": "be brief"},
                                           {"role": "user", "content": [{"type": "text",
                                                                         "text": "hello"}]}],
        "max_tokens": 4, "temperature": 0, "stream": True})
    events = parse_sse(response.text)
    assert events[-1][1] == "[DONE]"
    chunks = [data for _, data in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


async def test_chat_default_max_tokens_fits_the_context(server: Served,
                                                        loaded: LoadedModel) -> None:
    key = await create_tenant(server.client, "acme")
    response = await server.client.post("/v1/chat/completions", headers=auth(key), json={
        "model": loaded.name, "messages": [{"role": "user", "content": "hi " * 60}],
        "temperature": 0})
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] <= loaded.max_context


async def test_chat_without_a_template_is_400(server: Served, loaded: LoadedModel,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    key = await create_tenant(server.client, "acme")
    monkeypatch.setattr(loaded.tokenizer, "chat_template", None)
    response = await server.client.post("/v1/chat/completions", headers=auth(key), json={
        "model": loaded.name, "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 400
    assert "no chat template" in response.json()["error"]["message"]


async def test_models_for_the_operator(server: Served, loaded: LoadedModel) -> None:
    response = await server.client.get("/v1/models", headers=auth(ADMIN_KEY))
    short = Path(loaded.name).name  # the model directory's name, not its filesystem path
    assert [m["id"] for m in response.json()["data"]] == [short] and "/" in loaded.name
    for model in (short, loaded.name):  # the --model value still names the base model
        card = await server.client.get(f"/v1/models/{model}", headers=auth(ADMIN_KEY))
        assert card.json()["id"] == short, card.text
