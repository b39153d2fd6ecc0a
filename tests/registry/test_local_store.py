"""What only the local directory store does: several processes sharing one directory allocate
distinct versions (file lock), files appear atomically, and disk failures become
RegistryUnavailableError. Also `open_store` and the change fan-out."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from pathlib import Path

import pytest

from prefix_registry.artifact import PrefixArtifact
from prefix_registry.errors import RegistryUnavailableError
from prefix_registry.factory import open_store
from prefix_registry.local_store import LocalStore
from prefix_registry.redis_store import RedisStore
from prefix_registry.store import Notifier
from tests.registry.conftest import FP, make_tensors


def _writer(directory: str, worker: int, count: int) -> None:
    async def run() -> None:
        store = LocalStore(directory)
        for i in range(count):
            tensors = make_tensors("kv", seed=worker * 100 + i)
            artifact = PrefixArtifact.create(name="shared", tenant="acme", tensors=tensors,
                                             model=FP, description=f"{worker}-{i}")
            await store.put(artifact)
    asyncio.run(run())


def test_processes_sharing_a_directory_get_distinct_versions(tmp_path: Path) -> None:
    directory = str(tmp_path / "registry")
    asyncio.run(LocalStore(directory).create_tenant("acme"))
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_writer, args=(directory, w, 8)) for w in range(3)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(timeout=120)
        assert p.exitcode == 0

    async def check() -> None:
        store = LocalStore(directory)
        metas = await store.versions("acme", "shared")
        assert [m.version for m in metas] == list(range(1, 25))
        assert len({m.description for m in metas}) == 24  # every write kept, none overwritten
        for meta in metas:
            worker, i = map(int, meta.description.split("-"))
            got = await store.get("acme", meta.ref)
            assert got.meta.sha256 == meta.sha256
            assert got.meta.sha256 == PrefixArtifact.create(
                name="shared", tenant="acme", tensors=make_tensors("kv", seed=worker * 100 + i),
                model=FP).meta.sha256
    asyncio.run(check())


async def test_no_partial_files_are_left(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    await store.create_tenant("acme")
    artifacts = [PrefixArtifact.create(name="p", tenant="acme", tensors=make_tensors(seed=i),
                                       model=FP) for i in range(5)]  # 5 distinct uploads
    await asyncio.gather(*(store.put(artifact) for artifact in artifacts))
    files = sorted(os.listdir(tmp_path / "tenants" / "acme" / "prefixes" / "p"))
    assert files == ["1.safetensors", "2.safetensors", "3.safetensors", "4.safetensors",
                     "5.safetensors", "seq", "seq.lock"]


async def test_disk_failures_are_registry_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    store = LocalStore(blocker / "registry")
    with pytest.raises(RegistryUnavailableError, match="directory failed"):
        await store.create_tenant("acme")
    with pytest.raises(RegistryUnavailableError):
        await store.ping()


async def test_open_store_picks_the_backend(tmp_path: Path) -> None:
    local = open_store(None, directory=tmp_path)
    assert isinstance(local, LocalStore) and local.directory == tmp_path
    remote = open_store("redis://127.0.0.1:6379/0", namespace="ns:", directory=tmp_path)
    assert isinstance(remote, RedisStore) and remote.keys.ns == "ns:"
    await remote.close()


async def test_a_failing_subscriber_does_not_stop_the_others() -> None:
    notifier, heard = Notifier(), []

    def broken(tenant: str, name: str) -> None:
        raise RuntimeError("bug in a subscriber")

    async def async_cb(tenant: str, name: str) -> None:
        heard.append((tenant, name))

    notifier.add(broken, None)
    notifier.add(async_cb, lambda: heard.append(("reset", "")))
    await notifier.changed("acme", "p")
    await notifier.reset()
    assert heard == [("acme", "p"), ("reset", "")]
