"""The embedded local store (no --redis-url) with auth disabled: upload -> generate -> stream ->
delete, everyone acting as tenant `default` with operator rights."""

from __future__ import annotations

from pathlib import Path

from server.models.loader import LoadedModel
from server.settings import Settings
from tests.api.conftest import serve
from tests.api.helpers import decode, parse_sse, prefix_tensors, reference_greedy, safetensors_file


async def test_local_store_round_trip(loaded: LoadedModel, tmp_path: Path) -> None:
    settings = Settings(model=loaded.name, auth_disabled=True, data_dir=tmp_path / "store",
                        kv_cache_mb=1.0, max_batch_size=2)
    tensors = prefix_tensors(loaded, "p_theta", prefix_len=3, seed=5)
    async with serve(settings, loaded) as served:
        c = served.client
        assert (await c.get("/ready")).json()["checks"]["registry"] == "ok"
        made = await c.post("/admin/prefixes", data={"name": "local"},
                            files=[("file", ("t.safetensors", safetensors_file(tensors)))])
        assert made.status_code == 201, made.text
        assert made.json()["tenant"] == "default"
        assert any((tmp_path / "store").rglob("*")), "the prefix is stored in --data-dir"

        body = {"prompt": "hello world", "max_new_tokens": 6, "prefix_id": "local"}
        whole = (await c.post("/generate", json=body)).json()
        assert whole["text"] == decode(loaded, reference_greedy(loaded, "hello world", 6, tensors))
        streamed = parse_sse((await c.post("/generate", json={**body, "stream": True})).text)
        assert "".join(d["text"] for name, d in streamed if name == "delta") == whole["text"]
        assert streamed[-1][0] == "done"

        assert (await c.delete("/admin/prefixes/local")).json() == {"deleted": 1}
        gone = await c.post("/generate", json=body)
        assert gone.status_code == 404 and gone.json()["error"]["type"] == "not_found"
        tenants = (await c.get("/admin/tenants")).json()["items"]
        assert [t["name"] for t in tenants] == ["default"]
