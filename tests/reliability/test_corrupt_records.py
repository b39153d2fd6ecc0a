"""Corrupted registry records against real `prefix-serve` processes: one on Redis (its own
namespace of the test Redis), one on the embedded directory store. Every corruption of
`tests/corrupt_records.py` is written straight into the store under its own tenant, then every
route that reads such records is called. After each one the engine is alive (`/health` 200, and
an untouched tenant's prefix still generates); no answer is a 5xx other than the typed
`500 corrupt_record`, and no listing fails."""

from __future__ import annotations

import hashlib
import io
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from bench.load import p_theta_file
from prefix_registry.artifact import PrefixArtifact
from prefix_registry.redis_keys import Keys
from server.models.loader import LoadedModel
from tests.corrupt_records import Corruption, Place, of
from tests.redis_ns import REDIS_URL, delete_namespace, redis_error
from tests.reliability.conftest import record
from tests.reliability.procs import ADMIN_KEY, ServerProcess

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
LISTINGS = ("/admin/prefixes", "/v1/models", "/admin/tenants")


@pytest.fixture(scope="module")
def namespace() -> Iterator[str]:
    if redis_error() is not None:
        pytest.skip(f"Redis at {REDIS_URL} does not answer")
    ns = f"reliability-corrupt-{uuid.uuid4().hex[:8]}:"
    yield ns
    delete_namespace(ns)


@pytest.fixture(scope="module", params=["redis", "local"])
def served(request: pytest.FixtureRequest, model_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, ServerProcess, Path]]:
    workdir = tmp_path_factory.mktemp(f"corrupt-{request.param}")
    flags = ["--data-dir", str(workdir / "store")]
    if request.param == "redis":
        flags += ["--redis-url", REDIS_URL, "--namespace", request.getfixturevalue("namespace")]
    process = ServerProcess(model_dir, workdir, flags)
    process.start()
    yield request.param, process, workdir / "store"
    process.stop()


class Run:
    """One server's session: the statuses seen, by route kind."""

    def __init__(self, client: httpx.Client, model: LoadedModel, url: str) -> None:
        self.client, self.model, self.url = client, model, url
        self.statuses: Counter[str] = Counter()
        self.listings: Counter[int] = Counter()
        self.bad: list[str] = []  # any answer that breaks the promise

    def call(self, method: str, path: str, key: str, **kwargs: object) -> httpx.Response:
        response = self.client.request(method, self.url + path, headers=_auth(key), **kwargs)  # type: ignore[arg-type]
        error = response.json().get("error", {}) if response.status_code >= 400 else {}
        typed = error.get("type") if isinstance(error, dict) else None
        self.statuses[f"{response.status_code} {typed or ''}".strip()] += 1
        if response.status_code >= 500 and typed != "corrupt_record":
            self.bad.append(f"{method} {path}: {response.status_code} {response.text[:200]}")
        if response.status_code == 422:  # the server's data must never be blamed on the caller
            self.bad.append(f"{method} {path}: 422 {response.text[:200]}")
        return response

    def tenant(self, name: str) -> tuple[str, str, str]:
        """Create `name` with two keys and prefixes `style`, `other`: (key1, key_id1, key2)."""
        created = self.client.post(f"{self.url}/admin/tenants", headers=ADMIN,
                                   json={"name": name}).json()
        key2 = self.client.post(f"{self.url}/admin/tenants/{name}/keys",
                                headers=ADMIN).json()["api_key"]
        for prefix, seed in (("style", 1), ("other", 2)):
            self.upload(key2, prefix, seed, expect=201)
        return created["api_key"], created["key_id"], key2

    def upload(self, key: str, name: str, seed: int, expect: int | None = None) -> int:
        fp = self.model.fingerprint
        data = p_theta_file(fp.num_layers, 4, fp.hidden_size, seed=seed)
        files = {"file": ("p.safetensors", io.BytesIO(data), "application/octet-stream")}
        status = self.call("POST", "/admin/prefixes", key, data={"name": name},
                           files=files).status_code
        assert expect is None or status == expect
        return status

    def generate(self, key: str, prefix: str | None) -> int:
        body = {"prompt": "hello", "max_new_tokens": 2, "prefix_id": prefix}
        return self.call("POST", "/generate", key, json=body).status_code

    def every_route(self, tenant: str, key1: str, key_id: str, key2: str) -> None:
        """Each route that reads a prefix, key, tenant or counter record."""
        self.generate(key2, "style")
        self.generate(key1, "style@1")
        chat = {"model": "style", "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 2}
        self.call("POST", "/v1/chat/completions", key2, json=chat)
        self.call("POST", "/v1/completions", key2,
                  json={"model": "style", "prompt": "hi", "max_tokens": 2})
        for path in ("/v1/models/style", "/admin/prefixes/style"):
            self.call("GET", path, key2)
        for path in LISTINGS:
            self.listings[self.call("GET", path, ADMIN_KEY if "tenants" in path else key2,
                                    params={} if "tenants" in path else None).status_code] += 1
        self.upload(key2, "style", seed=7)
        self.upload(key2, "third", seed=8)
        self.call("GET", f"/admin/tenants/{tenant}/quota", ADMIN_KEY)
        self.call("DELETE", f"/admin/tenants/{tenant}/keys/{key_id}", ADMIN_KEY)
        self.call("DELETE", "/admin/prefixes/style", key2)


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _place(kind: str, store_dir: Path, namespace: str, tenant: str, key1: str,
           key_id: str, client: redis.Redis | None) -> Place:
    key_hash = hashlib.sha256(key1.encode()).hexdigest()
    if kind == "redis":
        keys = Keys(namespace)
        blob = client.get(keys.blob(tenant, "style", 1)) if client else None
        assert isinstance(blob, bytes)
        return Place(tenant, "style", key_id, key_hash, PrefixArtifact.from_bytes(blob),
                     client, keys)
    blob = (store_dir / "tenants" / tenant / "prefixes" / "style" / "1.safetensors").read_bytes()
    return Place(tenant, "style", key_id, key_hash, PrefixArtifact.from_bytes(blob),
                 root=store_dir)


def test_corrupted_records_fail_only_their_own_requests(
        served: tuple[str, ServerProcess, Path], model: LoadedModel, request: pytest.FixtureRequest
) -> None:
    kind, server, store_dir = served
    namespace = request.getfixturevalue("namespace") if kind == "redis" else ""
    corruptions: list[Corruption] = of(kind)
    sync = redis.Redis.from_url(REDIS_URL) if kind == "redis" else None
    alive = good_generations = 0
    with httpx.Client(timeout=60) as client:
        run = Run(client, model, server.url)
        _, _, anchor_key = run.tenant("anchor")  # a tenant nobody corrupts
        for i, corruption in enumerate(corruptions):
            tenant = f"t{i}"
            key1, key_id, key2 = run.tenant(tenant)
            corruption.write(_place(kind, store_dir, namespace, tenant, key1, key_id, sync))
            run.every_route(tenant, key1, key_id, key2)
            alive += client.get(f"{server.url}/health").status_code == 200
            good_generations += run.generate(anchor_key, "style") == 200
    if sync is not None:
        sync.close()
    record(f"corrupt records ({kind})", corruptions=len(corruptions),
           health_200_after=alive, good_prefix_generates_after=good_generations,
           listings=dict(run.listings), statuses=dict(run.statuses),
           promise_broken=len(run.bad))
    assert run.bad == [], (run.bad, server.tail())
    assert alive == good_generations == len(corruptions), server.tail()
    assert set(run.listings) == {200}
    assert run.statuses["500 corrupt_record"] > 0
