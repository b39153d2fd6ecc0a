"""docs/peft.md runs as written: its Python recipe trains a prefix with PEFT on the tiny model
and saves the adapter; its prefixctl and curl lines upload that directory to the real server,
and the uploaded prefix serves."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

import clients
from server.models.loader import LoadedModel
from tests.clients.conftest import ADMIN_KEY, LiveServer

DOC = Path(__file__).resolve().parents[2] / "docs" / "peft.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), re.S)


def test_the_peft_recipe_trains_saves_and_uploads(
    server: LiveServer, loaded: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    adapter = tmp_path / "adapter"
    monkeypatch.setenv("MODEL", loaded.name)
    monkeypatch.setenv("ADAPTER", str(adapter))
    (recipe,) = blocks("python")
    exec(compile(recipe, str(DOC), "exec"), {"__name__": "recipe"})  # noqa: S102 - our own doc
    saved = {p.name for p in adapter.iterdir()}  # PEFT also writes a README.md model card
    assert {"adapter_config.json", "adapter_model.safetensors"} <= saved
    with clients.PrefixClient(server.url, ADMIN_KEY) as admin:
        key = admin.create_tenant("sailor").api_key
    env = {**os.environ, "URL": server.url, "KEY": key, "ADAPTER": str(adapter)}
    uploads = blocks("bash")
    assert len(uploads) == 2  # prefixctl, then curl
    for number, command in enumerate(uploads, start=1):
        done = subprocess.run(["bash", "-euc", command], env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        if command.lstrip().startswith("curl"):
            assert json.loads(done.stdout)["version"] == number, done.stdout
    with clients.PrefixClient(server.url, key) as sailor:
        info = sailor.get_prefix("pirate")
        assert (info.version, info.prefix_len, info.compatible) == (2, 10, True)
        out = sailor.generate("pirate", "Where is the treasure?", max_new_tokens=4)
        assert out.prefix is not None and out.prefix.id == "pirate"
        assert out.usage.prefix_tokens == 10
