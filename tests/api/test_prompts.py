"""Prompts are tokenized off the event loop, and a prompt whose byte length alone proves it
cannot fit the context is refused without being tokenized."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from server.api.prompts import PromptEncoder
from server.models.loader import LoadedModel
from tests.api.conftest import Served
from tests.api.helpers import ADMIN_KEY, auth, decode, reference_greedy


def _spy(monkeypatch: pytest.MonkeyPatch, tokenizer: Any, method: str) -> list[str]:
    """Record the thread each call of `tokenizer.method` runs on."""
    threads: list[str] = []
    real: Callable[..., Any] = getattr(tokenizer, method)

    def spy(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(tokenizer, method, spy)
    return threads


async def test_prompts_are_tokenized_off_the_event_loop(
    server: Served, loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop_thread = threading.current_thread().name  # the in-process app runs on this loop
    encodes = _spy(monkeypatch, loaded.tokenizer, "encode")
    templates = _spy(monkeypatch, loaded.tokenizer, "apply_chat_template")
    generated = await server.client.post("/generate", headers=auth(ADMIN_KEY),
                                         json={"prompt": "hello world", "max_new_tokens": 4})
    assert generated.json()["text"] == decode(loaded, reference_greedy(loaded, "hello world", 4))
    completion = await server.client.post("/v1/completions", headers=auth(ADMIN_KEY), json={
        "model": loaded.name, "prompt": "hello", "max_tokens": 2})
    chat = await server.client.post("/v1/chat/completions", headers=auth(ADMIN_KEY), json={
        "model": loaded.name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert [r.status_code for r in (completion, chat)] == [200, 200]
    assert len(encodes) >= 2 and len(templates) == 1
    assert loop_thread not in encodes + templates


async def test_a_prompt_too_long_by_its_bytes_is_refused_untokenized(
    server: Served, loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    encodes = _spy(monkeypatch, loaded.tokenizer, "encode")
    huge = "word " * 200_000  # 1 MB; the tiny model's context is 256 tokens
    for path, body in (("/generate", {"prompt": huge}),
                       ("/v1/completions", {"model": loaded.name, "prompt": huge}),
                       ("/v1/chat/completions", {"model": loaded.name, "max_tokens": 2,
                                                 "messages": [{"role": "user", "content": huge}]})):
        response = await server.client.post(path, headers=auth(ADMIN_KEY), json=body)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["type"] == "context_length_exceeded"
    assert encodes == []


def test_the_byte_bound_never_exceeds_the_real_count(loaded: LoadedModel) -> None:
    encoder = PromptEncoder(loaded.tokenizer, context=loaded.max_context)
    try:
        for text in ("hello world", "ünïcödé " * 50, "日本語のテキスト" * 30, "x" * 5000,
                     " " * 999, "a\nb\tc" * 100):
            assert encoder.min_tokens(text) <= len(loaded.tokenizer.encode(text))
    finally:
        encoder.close()


async def test_the_context_length_message_is_plain(server: Served) -> None:
    """What does not fit, and by how much, in words that match the numbers."""
    body = {"prompt": "hi", "max_new_tokens": 100_000}
    response = await server.client.post("/generate", headers=auth(ADMIN_KEY), json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == {"type": "context_length_exceeded", "message": (
        "the prompt (2 characters: at least 1 token) with the prefix and the tokens to generate "
        "(100000 together) exceeds the model's context of 256 tokens")}
