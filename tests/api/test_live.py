"""Against a real uvicorn on loopback: the official `openai` client (plain and streaming), and a
client that hangs up mid-stream frees its request in the engine."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from server.engine import Engine
from server.models.loader import LoadedModel
from tests.api.conftest import SettingsFactory
from tests.api.helpers import (
    ADMIN_KEY,
    auth,
    decode,
    prefix_tensors,
    reference_greedy,
    safetensors_file,
)
from tests.api.live import LiveServer, live_server, wait_for
from tests.engine.helpers import OnForward

PROMPT = "hello world"
N = 8


@pytest.fixture
def live(make_settings: SettingsFactory, loaded: LoadedModel) -> Iterator[LiveServer]:
    with live_server(make_settings(served_model_name="tiny-llama"), loaded) as server:
        yield server


def new_tenant(live: LiveServer, name: str) -> str:
    response = httpx.post(f"{live.url}/admin/tenants", headers=auth(ADMIN_KEY), json={"name": name})
    assert response.status_code == 201, response.text
    return str(response.json()["api_key"])


def test_openai_client(live: LiveServer, loaded: LoadedModel) -> None:
    key = new_tenant(live, "acme")
    tensors = prefix_tensors(loaded, "kv", seed=7)
    made = httpx.post(f"{live.url}/admin/prefixes", headers=auth(key), data={"name": "style"},
                      files=[("file", ("p.safetensors", safetensors_file(tensors)))])
    assert made.status_code == 201, made.text
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key=key, max_retries=0)
    expected = decode(loaded, reference_greedy(loaded, PROMPT, N, tensors))

    plain = client.completions.create(model="style", prompt=PROMPT, max_tokens=N, temperature=0)
    assert plain.choices[0].text == expected
    assert plain.usage is not None and plain.usage.completion_tokens <= N
    stream = client.completions.create(model="style", prompt=PROMPT, max_tokens=N, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0

    models = [m.id for m in client.models.list()]
    assert models == ["tiny-llama", "style"]
    assert client.models.retrieve("style").id == "style"
    assert client.models.retrieve("style@1").owned_by == "acme"
    assert client.models.retrieve("tiny-llama").id == "tiny-llama"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-prefix")


def test_openai_chat(live: LiveServer, loaded: LoadedModel) -> None:
    key = new_tenant(live, "acme")
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key=key, max_retries=0)
    # tests/tiny.py's chat template, written out by hand
    prompt_ids = loaded.tokenizer("<|user|>hello world\n<|assistant|>")["input_ids"]
    expected = decode(loaded, reference_greedy(loaded, prompt_ids, N))
    messages = [{"role": "user", "content": "hello world"}]
    chat = client.chat.completions.create(model="tiny-llama", messages=messages,  # type: ignore[arg-type]
                                          max_tokens=N, temperature=0)
    assert chat.choices[0].message.content == expected
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage is not None and chat.usage.prompt_tokens == len(prompt_ids)
    stream: Any = client.chat.completions.create(
        model="tiny-llama", messages=messages,  # type: ignore[arg-type]
        max_tokens=N, temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == expected


def test_openai_errors(live: LiveServer) -> None:
    key = new_tenant(live, "acme")
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="n"):
        client.completions.create(model="tiny-llama", prompt="hi", max_tokens=2, n=2)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-prefix", prompt="hi", max_tokens=2)
    bad = openai.OpenAI(base_url=f"{live.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def _slow_steps(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each engine step takes at least 10 ms, so a 240-token request outlives the time it takes
    the server to notice a closed connection, however fast or loaded the machine is."""
    monkeypatch.setattr(engine, "step_hook", OnForward(lambda work: time.sleep(0.01)))


def test_disconnect_mid_stream_frees_the_request(
    live: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = new_tenant(live, "acme")
    engine = live.services.engine
    _slow_steps(engine, monkeypatch)
    body = {"prompt": PROMPT, "max_new_tokens": 240, "stream": True}
    with httpx.Client(base_url=live.url, timeout=30) as client, client.stream(
        "POST", "/generate", headers=auth(key), json=body
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("event: delta"):
                break
        assert engine.stats().running == 1
    # The connection is closed with the stream unfinished: the engine drops the request.
    wait_for(lambda: engine.stats().running == 0 and engine.stats().waiting == 0)
    assert engine.stats().tokens_generated < 240  # cancelled, not run to the end
    assert engine.stats().kv_blocks_used == 0


def test_disconnect_while_waiting_for_a_whole_response_frees_the_request(
    live: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = new_tenant(live, "acme")
    engine = live.services.engine
    _slow_steps(engine, monkeypatch)
    body = json.dumps({"prompt": PROMPT, "max_new_tokens": 240}).encode()
    host, port = live.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {key}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        wait_for(lambda: engine.stats().running == 1)
    wait_for(lambda: engine.stats().running == 0 and engine.stats().waiting == 0)
    assert engine.stats().tokens_generated < 240
