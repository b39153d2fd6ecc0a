"""The streams' bytes on the wire, against a real uvicorn: LF only, `data: <json>\\n\\n` events
(`[DONE]` last on the OpenAI routes), read alike by a parser written as vLLM's benchmark client
parses, by the official openai SDK and by the project's SDK; keep-alive comments only while a
stream has nothing to send."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import httpx
import openai
import pytest

import clients
from server.models.loader import LoadedModel
from tests.api.conftest import SettingsFactory
from tests.api.helpers import ADMIN_KEY, auth, decode, reference_greedy
from tests.api.live import LiveServer, live_server, wait_for
from tests.engine.helpers import OnForward

PROMPT = "hello world"
N = 6
MESSAGES = [{"role": "user", "content": "hello world"}]
CHAT_PROMPT = "<|user|>hello world\n<|assistant|>"  # tests/tiny.py's chat template, by hand


@pytest.fixture
def live(make_settings: SettingsFactory, loaded: LoadedModel) -> Iterator[LiveServer]:
    with live_server(make_settings(served_model_name="tiny-llama"), loaded) as server:
        yield server


def new_tenant(live: LiveServer, name: str = "acme") -> str:
    response = httpx.post(f"{live.url}/admin/tenants", headers=auth(ADMIN_KEY), json={"name": name})
    assert response.status_code == 201, response.text
    return str(response.json()["api_key"])


def streams() -> dict[str, dict[str, Any]]:
    """Every streaming route's body."""
    return {
        "/generate": {"prompt": PROMPT, "max_new_tokens": N, "stream": True},
        "/v1/completions": {"model": "tiny-llama", "prompt": PROMPT, "max_tokens": N,
                            "temperature": 0, "stream": True,
                            "stream_options": {"include_usage": True}},
        "/v1/chat/completions": {"model": "tiny-llama", "messages": MESSAGES, "max_tokens": N,
                                 "temperature": 0, "stream": True,
                                 "stream_options": {"include_usage": True}},
    }


def raw_stream(live: LiveServer, key: str, path: str, body: dict[str, Any]) -> bytes:
    with httpx.Client(base_url=live.url, timeout=60) as client, client.stream(
        "POST", path, headers=auth(key), json=body
    ) as response:
        assert response.status_code == 200
        return b"".join(response.iter_raw())


def blocks(raw: bytes) -> list[str]:
    """The events of an LF-only stream, keep-alive comments left out."""
    text = raw.decode()
    assert text.endswith("\n\n")
    return [b for b in text[:-2].split("\n\n") if not b.startswith(":")]


@pytest.mark.parametrize("path", list(streams()))
def test_every_stream_is_lf_only_data_events(live: LiveServer, path: str) -> None:
    key = new_tenant(live)
    raw = raw_stream(live, key, path, streams()[path])
    assert b"\r" not in raw
    assert b": ping" not in raw
    events = blocks(raw)
    if path == "/generate":  # named events: `event: NAME\ndata: JSON`
        names = [b.split("\n")[0] for b in events]
        assert names[:-1] == ["event: delta"] * (len(events) - 1) and names[-1] == "event: done"
        bodies = [b.split("\n", 1)[1] for b in events]
        assert all(b.count("\n") == 0 for b in bodies)
    else:
        assert events[-1] == "data: [DONE]"
        bodies = events[:-1]
    for body in bodies:
        assert body.startswith("data: ") and "\n" not in body
        json.loads(body.removeprefix("data: "))


class VllmStyleHandler:
    """As vLLM's benchmark client buffers a stream (vllm/benchmarks/lib/endpoint_request_func.py,
    StreamedResponseHandler): split on "\\n\\n"; a buffer that is a whole `data:` JSON or
    `[DONE]` counts as a message too."""

    def __init__(self) -> None:
        self.buffer = ""

    def add_chunk(self, chunk_bytes: bytes) -> list[str]:
        self.buffer += chunk_bytes.decode("utf-8")
        messages = []
        while "\n\n" in self.buffer:
            message, self.buffer = self.buffer.split("\n\n", 1)
            if message := message.strip():
                messages.append(message)
        if self.buffer.startswith("data: "):
            content = self.buffer.removeprefix("data: ").strip()
            if content == "[DONE]":
                messages.append(self.buffer.strip())
                self.buffer = ""
            elif content:
                try:
                    json.loads(content)
                except json.JSONDecodeError:
                    pass  # incomplete: wait for more
                else:
                    messages.append(self.buffer.strip())
                    self.buffer = ""
        return messages


async def vllm_style_read(url: str, key: str, body: dict[str, Any]) -> tuple[str, int, bool]:
    """(text, completion tokens from usage, [DONE] seen), read as vLLM's client reads: each
    network chunk stripped, then buffered; comments skipped; `data: ` removed."""
    text, completion_tokens, done = "", 0, False
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.post(
        url, json=body, headers=auth(key)
    ) as response:
        assert response.status == 200
        handler = VllmStyleHandler()
        async for chunk_bytes in response.content.iter_any():
            chunk_bytes = chunk_bytes.strip()
            if not chunk_bytes:
                continue
            for message in handler.add_chunk(chunk_bytes):
                if message.startswith(":"):
                    continue
                chunk = message.removeprefix("data: ")
                if chunk == "[DONE]":
                    done = True
                    continue
                data = json.loads(chunk)
                if choices := data.get("choices"):
                    part = choices[0].get("text") if "text" in choices[0] else (
                        choices[0]["delta"].get("content"))
                    text += part or ""
                elif usage := data.get("usage"):
                    completion_tokens = usage["completion_tokens"]
    return text, completion_tokens, done


def expected_texts(loaded: LoadedModel) -> dict[str, str]:
    chat_ids = loaded.tokenizer(CHAT_PROMPT)["input_ids"]
    return {"/v1/completions": decode(loaded, reference_greedy(loaded, PROMPT, N)),
            "/v1/chat/completions": decode(loaded, reference_greedy(loaded, chat_ids, N))}


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_vllm_benchmark_style_parser_reads_the_streams(live: LiveServer, loaded: LoadedModel,
                                                       path: str) -> None:
    key = new_tenant(live)
    text, completion_tokens, done = asyncio.run(
        vllm_style_read(live.url + path, key, streams()[path]))
    assert done
    assert text == expected_texts(loaded)[path]
    assert 0 < completion_tokens <= N


def test_openai_sdk_and_project_sdk_read_the_streams(live: LiveServer,
                                                     loaded: LoadedModel) -> None:
    key = new_tenant(live)
    expected = expected_texts(loaded)
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key=key, max_retries=0)
    completion = list(client.completions.create(
        model="tiny-llama", prompt=PROMPT, max_tokens=N, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in completion if c.choices) == (
        expected["/v1/completions"])
    assert completion[-1].usage is not None
    chat: Any = client.chat.completions.create(
        model="tiny-llama", messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=N, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chat if c.choices) == (
        expected["/v1/chat/completions"])
    with clients.PrefixClient(live.url, key) as sdk, sdk.stream(
        None, PROMPT, max_new_tokens=N
    ) as stream:
        text = "".join(stream)
    assert text == expected["/v1/completions"] and stream.result.text == text


def slow_steps(server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every engine step takes 0.3 s: streams sit idle between their events."""
    engine = server.services.engine
    assert engine is not None
    monkeypatch.setattr(engine, "step_hook", OnForward(lambda work: time.sleep(0.3)))


def short(path: str) -> dict[str, Any]:
    return {**streams()[path], **({"max_new_tokens": 3} if path == "/generate" else
                                  {"max_tokens": 3})}


@pytest.mark.parametrize("path", list(streams()))
def test_no_comments_by_default_even_when_idle(live: LiveServer, path: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    key = new_tenant(live)
    slow_steps(live, monkeypatch)
    raw = raw_stream(live, key, path, short(path))
    assert b"\r" not in raw and b"\n:" not in raw and not raw.startswith(b":")
    if path != "/generate":
        text, _, done = asyncio.run(vllm_style_read(live.url + path, key, short(path)))
        assert done and text == "".join(
            json.loads(b.removeprefix("data: "))["choices"][0].get("text") or json.loads(
                b.removeprefix("data: "))["choices"][0].get("delta", {}).get("content") or ""
            for b in blocks(raw)[:-1] if json.loads(b.removeprefix("data: "))["choices"])


@pytest.fixture
def idle_live(make_settings: SettingsFactory, loaded: LoadedModel,
              monkeypatch: pytest.MonkeyPatch) -> Iterator[LiveServer]:
    """--sse-keepalive-s 0.05, and every engine step takes 0.3 s (so streams idle)."""
    settings = make_settings(served_model_name="tiny-llama", sse_keepalive_s=0.05)
    with live_server(settings, loaded) as server:
        slow_steps(server, monkeypatch)
        yield server


@pytest.mark.parametrize("path", list(streams()))
def test_idle_streams_get_keep_alive_comments_that_sdks_skip(
    idle_live: LiveServer, path: str
) -> None:
    key = new_tenant(idle_live)
    raw = raw_stream(idle_live, key, path, short(path))
    assert b"\r" not in raw
    assert raw.count(b": keep-alive\n\n") >= 1
    events = blocks(raw)
    assert len(events) >= 2
    if path == "/generate":
        with clients.PrefixClient(idle_live.url, key) as sdk, sdk.stream(
            None, PROMPT, max_new_tokens=3
        ) as stream:
            assert "".join(stream) == stream.result.text
        return
    assert events[-1] == "data: [DONE]"
    client = openai.OpenAI(base_url=f"{idle_live.url}/v1", api_key=key, max_retries=0)
    sdk_stream: Any = (
        client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=3,
                                  temperature=0, stream=True)
        if path == "/v1/completions" else
        client.chat.completions.create(model="tiny-llama", messages=MESSAGES,  # type: ignore[arg-type]
                                       max_tokens=3, temperature=0, stream=True))
    with_choices = [e for e in events[:-1] if json.loads(e.removeprefix("data: "))["choices"]]
    assert len([c for c in sdk_stream if c.choices]) == len(with_choices)


def test_hanging_up_a_kept_alive_stream_frees_its_request(idle_live: LiveServer) -> None:
    key = new_tenant(idle_live)
    engine = idle_live.services.engine
    assert engine is not None
    body = {"prompt": PROMPT, "max_new_tokens": 240, "stream": True}
    with httpx.Client(base_url=idle_live.url, timeout=30) as client, client.stream(
        "POST", "/generate", headers=auth(key), json=body
    ) as response:
        for line in response.iter_lines():
            if line.startswith("event: delta"):
                break
        assert engine.stats().running == 1
    wait_for(lambda: engine.stats().running == 0 and engine.stats().waiting == 0)
    assert engine.stats().tokens_generated < 240
    assert engine.stats().kv_blocks_used == 0
