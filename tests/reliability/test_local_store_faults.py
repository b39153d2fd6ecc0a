"""kill -9 of a real `prefix-serve` process on the embedded directory store while uploads are
being written: after a restart on the same directory no half-written version is visible, no
temporary file is left, and every acknowledged upload is there."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.load import p_theta_file
from server.models.loader import LoadedModel
from tests.reliability.conftest import record
from tests.reliability.procs import ADMIN_KEY, ServerProcess

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
WRITERS = 6


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def first(model_dir: Path, data_dir: Path, tmp_path: Path) -> Iterator[ServerProcess]:
    process = ServerProcess(model_dir, tmp_path / "first", ["--data-dir", str(data_dir)])
    process.start()
    yield process
    process.stop()


def _temporary_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*.tmp")]


async def test_kill_9_during_uploads_leaves_nothing_half_written(
    first: ServerProcess, model_dir: Path, data_dir: Path, model: LoadedModel, tmp_path: Path
) -> None:
    fp = model.fingerprint
    acked: list[tuple[str, int]] = []
    async with httpx.AsyncClient(timeout=60) as client:
        created = await client.post(f"{first.url}/admin/tenants", headers=ADMIN,
                                    json={"name": "writer"})
        auth = {"Authorization": f"Bearer {created.json()['api_key']}"}

        async def writer(w: int) -> None:
            for i in range(10_000):
                # up to ~0.5 MB per version: big enough to be caught mid-write now and then
                length = 16 + (i * 37 + w * 11) % 200
                data = p_theta_file(fp.num_layers, length, fp.hidden_size, seed=w * 10_000 + i)
                files = {"file": ("p.safetensors", io.BytesIO(data), "application/octet-stream")}
                try:
                    r = await client.post(f"{first.url}/admin/prefixes", headers=auth,
                                          data={"name": f"w{w}"}, files=files)
                except httpx.HTTPError:
                    return  # the server died under us
                if r.status_code == 201:
                    acked.append((f"w{w}", r.json()["version"]))

        tasks = [asyncio.create_task(writer(w)) for w in range(WRITERS)]
        while len(acked) < 3 * WRITERS:
            await asyncio.sleep(0.05)
        first.kill()
        await asyncio.gather(*tasks)
    orphans_at_kill = len(_temporary_files(data_dir))

    second = ServerProcess(model_dir, tmp_path / "second", ["--data-dir", str(data_dir)])
    second.start()
    try:
        left = _temporary_files(data_dir)
        visible, broken, missing = await _check_versions(second.url, auth, acked)
    finally:
        second.stop()
    record("kill -9 during uploads (local store)", acked_uploads=len(acked),
           temp_files_at_kill=orphans_at_kill, temp_files_after_restart=len(left),
           visible_versions=visible, half_written_visible=len(broken),
           lost_writes=len(missing))
    assert left == [], left
    assert broken == [] and missing == [], (broken, missing)


async def _check_versions(url: str, auth: dict[str, str], acked: list[tuple[str, int]]
                          ) -> tuple[int, list[str], list[str]]:
    """Every visible version must load and serve; every acknowledged one must be visible."""
    visible, broken = 0, []
    stored: set[tuple[str, int]] = set()
    async with httpx.AsyncClient(timeout=60) as client:
        for w in range(WRITERS):
            r = await client.get(f"{url}/admin/prefixes/w{w}", headers=auth)
            versions = [v["version"] for v in r.json()["versions"]] if r.status_code == 200 else []
            for version in versions:
                visible += 1
                stored.add((f"w{w}", version))
                g = await client.post(f"{url}/generate", headers=auth, json={
                    "prompt": "hi", "max_new_tokens": 1, "prefix_id": f"w{w}@{version}"})
                if g.status_code != 200:
                    broken.append(f"w{w}@{version}: {g.status_code} {g.text[:200]}")
    missing = [f"{n}@{v}" for n, v in acked if (n, v) not in stored]
    return visible, broken, missing
