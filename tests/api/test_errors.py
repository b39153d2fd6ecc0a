"""Every failure is `{"error": {"type", "message"}}` with the right status: 400, 404, 413 (while
the body streams in), 422, 429 (+ Retry-After), 503 (registry down, shutting down)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import httpx
import pytest

from server.models.loader import LoadedModel
from tests.api.conftest import Served, SettingsFactory, serve
from tests.api.helpers import (
    ADMIN_KEY,
    auth,
    create_tenant,
    prefix_tensors,
    safetensors_file,
    upload,
)


def assert_error(response: httpx.Response, status: int, error_type: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}
    assert body["error"]["type"] == error_type and body["error"]["message"]
    return str(body["error"]["message"])


async def test_400_context_length_and_unknown_route(server: Served) -> None:
    key = await create_tenant(server.client, "acme")
    too_long = await server.client.post("/generate", headers=auth(key),
                                        json={"prompt": "hi", "max_new_tokens": 1000})
    assert_error(too_long, 400, "context_length_exceeded")
    assert_error(await server.client.get("/nowhere"), 404, "not_found")
    assert_error(await server.client.put("/generate"), 405, "method_not_allowed")


@pytest.mark.parametrize("body,where", [
    ({"prompt": "hi", "temperature": -1}, "temperature"),
    ({"prompt": "hi", "max_new_tokens": 0}, "max_new_tokens"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "stop": [""]}, "stop"),
    ({"prompt": "hi", "temprature": 0.5}, "temprature"),
    ({"prompt": "hi", "prefix_id": "a b"}, "prefix_id"),
    ({"max_new_tokens": 3}, "prompt"),
])
async def test_422_validation(server: Served, body: dict, where: str) -> None:
    key = await create_tenant(server.client, "acme")
    response = await server.client.post("/generate", headers=auth(key), json=body)
    assert where in assert_error(response, 422, "validation_error")


async def test_422_malformed_json_is_not_a_500(server: Served) -> None:
    key = await create_tenant(server.client, "acme")
    response = await server.client.post("/generate", headers={**auth(key),
                                        "content-type": "application/json"}, content=b"{nope")
    assert_error(response, 422, "validation_error")


async def test_bad_uploads(server: Served, loaded: LoadedModel) -> None:
    c = server.client
    key = await create_tenant(c, "acme")
    good = safetensors_file(prefix_tensors(loaded))
    assert_error(await upload(c, key, "x", {"notes.bin": b"\x80\x04pickle"}), 422,
                 "validation_error")
    narrow = prefix_tensors(loaded, "p_theta")["p_theta"][..., :7].contiguous()  # d_model 7
    wrong_width = safetensors_file({"p_theta": narrow})
    assert_error(await upload(c, key, "x", {"p.safetensors": wrong_width}), 422,
                 "validation_error")
    assert_error(await upload(c, key, "bad name!", {"p.safetensors": good}), 422,
                 "validation_error")
    no_name = await c.post("/admin/prefixes", headers=auth(key),
                           files=[("file", ("p.safetensors", good))])
    assert "name" in assert_error(no_name, 422, "validation_error")
    no_file = await c.post("/admin/prefixes", headers=auth(key), data={"name": "x"},
                           files=[("description", (None, b"d"))])
    assert_error(no_file, 422, "validation_error")
    not_multipart = await c.post("/admin/prefixes", headers=auth(key), json={"name": "x"})
    assert_error(not_multipart, 400, "invalid_request")
    stray = await upload(c, key, "x", {"p.safetensors": good}, colour="red")
    assert "colour" in assert_error(stray, 400, "invalid_request")
    broken = await c.post("/admin/prefixes", headers={**auth(key),
                          "content-type": "multipart/form-data; boundary=zzz"},
                          content=b"--zzz\r\nContent-Disposition: form-data\r\n\r\nx\r\n--zzz--")
    assert_error(broken, 400, "invalid_request")


async def test_422_prefix_for_another_model(server: Served, loaded: LoadedModel,
                                            tiny_model_dir: object) -> None:
    """A native artifact made for a different model (same shapes, other weights) is refused."""
    from prefix_registry.artifact import PrefixArtifact
    from prefix_registry.fingerprint import ModelFingerprint

    key = await create_tenant(server.client, "acme")
    other = ModelFingerprint(**{**loaded.fingerprint.to_dict(), "digest": "0" * 64})
    artifact = PrefixArtifact.create(name="alien", tenant="acme", model=other,
                                     tensors=prefix_tensors(loaded))
    response = await upload(server.client, key, "alien", {"a.safetensors": artifact.to_bytes()})
    assert "different model" in assert_error(response, 422, "incompatible_prefix")


async def test_413_declared_length(make_settings: SettingsFactory, loaded: LoadedModel) -> None:
    async with serve(make_settings(max_upload_mb=0.01), loaded) as served:
        key = await create_tenant(served.client, "acme")
        big = safetensors_file(prefix_tensors(loaded, prefix_len=64))  # ~32 KB > 10 KB
        assert_error(await upload(served.client, key, "big", {"p.safetensors": big}), 413,
                     "payload_too_large")


async def test_413_while_streaming(make_settings: SettingsFactory, loaded: LoadedModel) -> None:
    """No Content-Length: the 413 comes after about the limit, long before the body ends."""
    sent = 0
    chunk = b"x" * 4096

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent
        yield b'--b\r\nContent-Disposition: form-data; name="name"\r\n\r\nbig\r\n'
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="p"\r\n\r\n'
        for _ in range(2560):  # 10 MiB in all
            sent += len(chunk)
            yield chunk

    async with serve(make_settings(max_upload_mb=0.1), loaded) as served:
        key = await create_tenant(served.client, "acme")
        response = await served.client.post(
            "/admin/prefixes", content=body(),
            headers={**auth(key), "content-type": "multipart/form-data; boundary=b"})
    assert_error(response, 413, "payload_too_large")
    assert sent <= 0.1 * 2**20 + len(chunk)


async def test_429_when_the_queue_is_full(make_settings: SettingsFactory,
                                          loaded: LoadedModel) -> None:
    """One slot, a queue of one: a long request runs, one waits, the next is refused."""
    async with serve(make_settings(max_batch_size=1, max_queue=1), loaded) as served:
        key = await create_tenant(served.client, "acme")
        engine = served.services.engine
        long = {"prompt": "hello world", "max_new_tokens": 240, "stream": True}

        async def until(predicate: object) -> None:
            for _ in range(2000):
                if predicate():  # type: ignore[operator]
                    return
                await asyncio.sleep(0.002)
            raise AssertionError("engine never reached the expected state")

        running = asyncio.create_task(served.client.post("/generate", headers=auth(key), json=long))
        await until(lambda: engine.stats().running == 1)
        waiting = asyncio.create_task(served.client.post("/generate", headers=auth(key), json=long))
        await until(lambda: engine.stats().waiting == 1)
        refused = await served.client.post("/generate", headers=auth(key), json=long)
        assert_error(refused, 429, "overloaded")
        assert int(refused.headers["retry-after"]) >= 1
        assert (await running).status_code == (await waiting).status_code == 200


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_503_registry_down(make_settings: SettingsFactory, loaded: LoadedModel) -> None:
    settings = make_settings(redis_url=f"redis://127.0.0.1:{closed_port()}/0")
    async with serve(settings, loaded) as served:
        ready = await served.client.get("/ready")
        assert ready.status_code == 503
        assert ready.json()["status"] == "not_ready"
        assert ready.json()["checks"]["registry"].startswith("unavailable")
        assert ready.json()["checks"]["engine"] == "ok"
        listing = await served.client.get("/admin/prefixes", headers=auth(ADMIN_KEY))
        assert_error(listing, 503, "registry_unavailable")
        tenant_key = await served.client.post("/generate", headers=auth("psk-unknown"),
                                              json={"prompt": "hi"})
        assert_error(tenant_key, 503, "registry_unavailable")
        base = await served.client.post("/generate", headers=auth(ADMIN_KEY),
                                        json={"prompt": "hi", "max_new_tokens": 2})
        assert base.status_code == 200  # the base model needs no registry


async def test_503_shutting_down(server: Served) -> None:
    key = await create_tenant(server.client, "acme")
    server.services.lifecycle.begin_shutdown()
    response = await server.client.post("/generate", headers=auth(key), json={"prompt": "hi"})
    assert_error(response, 503, "shutting_down")
    assert response.headers["retry-after"]
    ready = await server.client.get("/ready")
    assert ready.status_code == 503 and ready.json()["status"] == "shutting_down"
    assert (await server.client.get("/health")).json() == {"status": "ok"}
