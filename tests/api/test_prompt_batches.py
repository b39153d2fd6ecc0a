"""Batches of prompts on `/v1/completions` (`prompt` as a list of texts or of token-id lists):
each prompt its own engine request, choices in prompt order with their `index`, streamed and
not, equal to each prompt's answer alone (greedy); all or nothing on refusal; every prompt
counted in the tokens per minute. The official openai client and LangChain run against uvicorn.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from server.api import engine_calls
from server.api.rate_limit import TokenRateLimiter
from server.models.loader import LoadedModel
from tests.api.conftest import Served, SettingsFactory, serve
from tests.api.helpers import (
    ADMIN_KEY,
    auth,
    create_tenant,
    decode,
    prefix_tensors,
    reference_greedy,
    safetensors_file,
)
from tests.api.live import LiveServer, live_server, wait_for
from tests.engine.helpers import OnForward

PROMPTS = ["hello world", "the cat sat", "a b c d e"]
N = 6


@pytest.fixture
def live(make_settings: SettingsFactory, loaded: LoadedModel) -> Iterator[LiveServer]:
    with live_server(make_settings(served_model_name="tiny-llama"), loaded) as server:
        yield server


def client_for(live: LiveServer) -> openai.OpenAI:
    created = httpx.post(f"{live.url}/admin/tenants", headers=auth(ADMIN_KEY),
                         json={"name": "acme"})
    assert created.status_code == 201, created.text
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=created.json()["api_key"],
                         max_retries=0)


def singles(client: openai.OpenAI, prompts: list[Any]) -> list[Any]:
    return [client.completions.create(model="tiny-llama", prompt=p, max_tokens=N, temperature=0)
            for p in prompts]


def test_openai_client_batches_in_prompt_order(live: LiveServer, loaded: LoadedModel) -> None:
    client = client_for(live)
    alone = singles(client, PROMPTS)
    expected = [r.choices[0].text for r in alone]
    batch = client.completions.create(model="tiny-llama", prompt=PROMPTS, max_tokens=N,
                                      temperature=0)
    assert [c.index for c in batch.choices] == [0, 1, 2]
    assert [c.text for c in batch.choices] == expected
    assert batch.usage is not None
    assert batch.usage.prompt_tokens == sum(r.usage.prompt_tokens for r in alone)
    assert batch.usage.completion_tokens == sum(r.usage.completion_tokens for r in alone)

    ids = [loaded.tokenizer(p)["input_ids"] for p in PROMPTS]
    by_ids = client.completions.create(model="tiny-llama", prompt=ids, max_tokens=N,
                                       temperature=0)
    assert [c.text for c in by_ids.choices] == expected
    one = client.completions.create(model="tiny-llama", prompt=ids[1], max_tokens=N,
                                    temperature=0)
    assert [c.text for c in one.choices] == [expected[1]]

    stream = client.completions.create(model="tiny-llama", prompt=PROMPTS, max_tokens=N,
                                       temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    texts: dict[int, str] = defaultdict(str)
    reasons: dict[int, str] = {}
    chunks = list(stream)
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason is not None:
                reasons[choice.index] = choice.finish_reason
    assert [texts[i] for i in range(3)] == expected
    assert sorted(reasons) == [0, 1, 2]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == batch.usage.total_tokens


def test_langchain_openai_batch(live: LiveServer) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    client = client_for(live)
    expected = [r.choices[0].text for r in singles(client, PROMPTS)]
    llm = langchain_openai.OpenAI(base_url=f"{live.url}/v1", api_key=client.api_key,
                                  model="tiny-llama", temperature=0, max_tokens=N,
                                  max_retries=0)
    assert llm.batch(PROMPTS) == expected
    generated = llm.generate(PROMPTS[:2])
    assert [g[0].text for g in generated.generations] == expected[:2]


# --- refusals: the whole batch, before anything runs --------------------------------------------


def count_submits(served: Served) -> list[Any]:
    submitted: list[Any] = []
    backend = served.services.backend
    submit = backend.submit

    async def counting(spec: Any) -> Any:
        submitted.append(spec)
        return await submit(spec)

    backend.submit = counting  # type: ignore[method-assign,assignment]
    return submitted


async def test_one_prompt_too_long_refuses_the_batch_before_any_is_submitted(
    server: Served, loaded: LoadedModel
) -> None:
    key = await create_tenant(server.client, "acme")
    submitted = count_submits(server)
    too_long = [1] * (loaded.max_context - 2)
    response = await server.client.post("/v1/completions", headers=auth(key), json={
        "model": loaded.name, "prompt": [[5, 6, 7], too_long], "max_tokens": 4})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "context_length_exceeded"
    assert submitted == []


async def test_prompts_per_request_are_bounded_and_n_is_still_refused(
    make_settings: SettingsFactory, loaded: LoadedModel
) -> None:
    async with serve(make_settings(max_prompts_per_request=2), loaded) as served:
        key = await create_tenant(served.client, "acme")
        submitted = count_submits(served)
        over = await served.client.post("/v1/completions", headers=auth(key), json={
            "model": loaded.name, "prompt": PROMPTS, "max_tokens": 2})
        assert over.status_code == 400
        assert "--max-prompts-per-request" in over.json()["error"]["message"]
        n = await served.client.post("/v1/completions", headers=auth(key), json={
            "model": loaded.name, "prompt": PROMPTS[:2], "max_tokens": 2, "n": 2})
        assert n.status_code == 400 and "n" in n.json()["error"]["message"]
        assert submitted == []


class FrozenClock:
    def __call__(self) -> float:
        return 1000.0


async def test_tokens_per_minute_count_each_prompt(server: Served, loaded: LoadedModel) -> None:
    server.services.rate_limiter = TokenRateLimiter(clock=FrozenClock())  # no refill
    key = await create_tenant(server.client, "acme")
    per_prompt = len(loaded.tokenizer(PROMPTS[0])["input_ids"]) + N
    per_minute = 2 * per_prompt + 1  # two prompts' reservations fit, three don't
    quota = await server.client.patch("/admin/tenants/acme/quota", headers=auth(ADMIN_KEY),
                                      json={"tokens_per_minute": per_minute})
    assert quota.status_code == 200, quota.text
    limiter = server.services.rate_limiter

    def charged() -> float:
        return per_minute - limiter.local.level("acme", per_minute)

    body = {"model": loaded.name, "max_tokens": N, "temperature": 0}
    refused = await server.client.post("/v1/completions", headers=auth(key),
                                       json={**body, "prompt": [PROMPTS[0]] * 3})
    assert refused.status_code == 429, refused.text
    assert charged() == 0  # the two reserved before the third was refused are given back
    served = await server.client.post("/v1/completions", headers=auth(key),
                                      json={**body, "prompt": [PROMPTS[0]] * 2})
    assert served.status_code == 200, served.text
    assert charged() == served.json()["usage"]["total_tokens"]  # both prompts, as used


def test_hanging_up_a_batch_stream_frees_every_prompt(live: LiveServer,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    client = client_for(live)
    engine = live.services.engine
    assert engine is not None
    monkeypatch.setattr(engine, "step_hook", OnForward(lambda work: time.sleep(0.01)))
    body = {"model": "tiny-llama", "prompt": PROMPTS, "max_tokens": 200, "stream": True}
    with httpx.Client(base_url=live.url, timeout=30) as http, http.stream(
        "POST", "/v1/completions", headers=auth(client.api_key), json=body
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                break
    wait_for(lambda: engine.stats().running + engine.stats().waiting == 0
             and not engine_calls._draining)
    assert engine.stats().tokens_generated < 3 * 200  # cancelled, not run to the end
    assert engine.stats().kv_blocks_used == 0


def test_a_batch_through_a_prefix_matches_each_prompt_alone(live: LiveServer,
                                                            loaded: LoadedModel) -> None:
    client = client_for(live)
    tensors = prefix_tensors(loaded, "kv", seed=7)
    made = httpx.post(f"{live.url}/admin/prefixes", headers=auth(client.api_key),
                      data={"name": "style"},
                      files=[("file", ("p.safetensors", safetensors_file(tensors)))])
    assert made.status_code == 201, made.text
    expected = [decode(loaded, reference_greedy(loaded, p, N, tensors)) for p in PROMPTS]
    batch = client.completions.create(model="style", prompt=PROMPTS, max_tokens=N, temperature=0)
    assert [c.text for c in batch.choices] == expected


async def test_a_batch_of_over_long_token_lists_is_refused_by_length(
    server: Served, loaded: LoadedModel
) -> None:
    key = await create_tenant(server.client, "acme")
    too_long = [1] * (loaded.max_context + 1)
    response = await server.client.post("/v1/completions", headers=auth(key), json={
        "model": loaded.name, "prompt": [[5, 6], too_long], "max_tokens": 1})
    assert response.status_code == 400
    assert "prompt 1 has" in response.json()["error"]["message"]  # before any item is validated


def test_langchain_chat_openai(live: LiveServer) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    client = client_for(live)
    messages = [{"role": "user", "content": p} for p in PROMPTS[:2]]
    expected = [client.chat.completions.create(
        model="tiny-llama", messages=[m], max_tokens=N, temperature=0,  # type: ignore[list-item]
    ).choices[0].message.content for m in messages]
    chat = langchain_openai.ChatOpenAI(base_url=f"{live.url}/v1", api_key=client.api_key,
                                       model="tiny-llama", temperature=0, max_tokens=N,
                                       max_retries=0)
    assert [m.content for m in chat.batch(PROMPTS[:2])] == expected
    assert "".join(str(c.content) for c in chat.stream(PROMPTS[0])) == expected[0]
