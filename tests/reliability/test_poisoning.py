"""KV poisoning against a real `prefix-serve` process (issue 17, finding 1).

A victim tenant's greedy outputs are recorded before any attack. Then an attacker tries the
issue's poisons: a kv-form prefix with keys 0 and layer-0 values the same +-1e38 vector in all
slots, a p_theta prefix of identical rows at +-3e37, and the kv one at +-3e38. Each upload must be
refused (422, naming the rule). The same poisons are then written as stored records straight
into the server's directory store (bypassing the upload check, as a corrupted or old record
would), and the attacker's requests run interleaved with the victim's, whose outputs must equal
their own outputs from before the attack, exactly. Figures: poisoning attempts, victim requests,
victim mismatches (0), /health.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import safetensors.torch
import torch

from bench.load import p_theta_file
from prefix_registry.artifact import PrefixArtifact, content_hash
from server.models.loader import LoadedModel
from tests.reliability.conftest import record
from tests.reliability.procs import ADMIN_KEY, ServerProcess

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
PROMPTS = ["hello", "the quick brown fox", "numbers 0 1 2", "prefix tuning steers", "caf\u00e9 oui"]
ROUNDS = 5
MAX_NEW = 8


@pytest.fixture(scope="module")
def served(model_dir: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[ServerProcess, Path]]:
    workdir = tmp_path_factory.mktemp("poisoning")
    process = ServerProcess(model_dir, workdir, ["--data-dir", str(workdir / "store")])
    process.start()
    yield process, workdir / "store"
    process.stop()


def poisons(model: LoadedModel, length: int = 8) -> dict[str, dict[str, torch.Tensor]]:
    fp = model.fingerprint
    shape = (fp.num_layers, fp.num_kv_heads, length, fp.head_dim)
    values = torch.zeros(shape)
    values[0] = torch.where(torch.arange(fp.head_dim) % 2 == 0, 1e38, -1e38)  # every slot
    row = torch.where(torch.arange(fp.hidden_size) % 2 == 0, 3e37, -3e37)
    return {
        "evil-kv": {"keys": torch.zeros(shape), "values": values},
        "evil-p": {"p_theta": row.expand(fp.num_layers, length, fp.hidden_size).clone()},
        "evil-kv-3e38": {"keys": torch.zeros(shape), "values": 3 * values},
    }


async def _upload(client: httpx.AsyncClient, url: str, key: str, name: str, data: bytes
                  ) -> httpx.Response:
    files = {"file": ("p.safetensors", io.BytesIO(data), "application/octet-stream")}
    return await client.post(f"{url}/admin/prefixes", headers=_auth(key), data={"name": name},
                             files=files)


async def _tenant(client: httpx.AsyncClient, url: str, name: str) -> str:
    response = await client.post(f"{url}/admin/tenants", headers=ADMIN, json={"name": name})
    assert response.status_code == 201, response.text
    return str(response.json()["api_key"])


async def _generate(client: httpx.AsyncClient, url: str, key: str, prompt: str,
                    prefix: str) -> httpx.Response:
    body = {"prompt": prompt, "max_new_tokens": MAX_NEW, "prefix_id": prefix,
            "temperature": 0}
    return await client.post(f"{url}/generate", headers=_auth(key), json=body)


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _inject(store: Path, tenant: str, name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Replace version 1 of `name` in the directory store with `tensors`, its metadata made to
    agree (hash, size, length), as a record the upload check never saw."""
    path = store / "tenants" / tenant / "prefixes" / name / "1.safetensors"
    stored = PrefixArtifact.from_bytes(path.read_bytes())
    length = next(iter(tensors.values())).shape[-2]
    form = "kv" if "keys" in tensors else "p_theta"
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    meta = dataclasses.replace(stored.meta, sha256=content_hash(tensors), size_bytes=size,
                               prefix_len=length, form=form)
    path.write_bytes(PrefixArtifact(meta, tensors).to_bytes())


async def test_a_tenant_s_poisoned_prefix_never_changes_another_tenant_s_outputs(
    served: tuple[ServerProcess, Path], model: LoadedModel
) -> None:
    process, store = served
    url, fp = process.url, model.fingerprint
    bad: dict[str, dict[str, torch.Tensor]] = poisons(model)
    async with httpx.AsyncClient(timeout=120) as client:
        alice, mallory = await _tenant(client, url, "alice"), await _tenant(client, url, "mallory")
        style = p_theta_file(fp.num_layers, 5, fp.hidden_size, seed=1)
        assert (await _upload(client, url, alice, "style", style)).status_code == 201
        before = [(await _generate(client, url, alice, p, "style")).json()["text"]
                  for p in PROMPTS]

        refused: Counter[int] = Counter()
        for name, tensors in bad.items():  # the upload check refuses every poison
            response = await _upload(client, url, mallory, name, safetensors.torch.save(tensors))
            refused[response.status_code] += 1
            assert response.status_code == 422, response.text
            message = response.json()["error"]["message"]
            assert "sqrt(max(float32) / head_dim)" in message or "not finite" in message, message

        for i, name in enumerate(bad):  # stored as benign, then overwritten in the store
            benign = p_theta_file(fp.num_layers, 8, fp.hidden_size, seed=10 + i)
            assert (await _upload(client, url, mallory, name, benign)).status_code == 201
            _inject(store, "mallory", name, bad[name])

        attacks: Counter[str] = Counter()
        victims = mismatches = 0
        for _ in range(ROUNDS):
            attack = [_generate(client, url, mallory, PROMPTS[j % len(PROMPTS)], name)
                      for j, name in enumerate([*bad, *bad])]
            victim = [_generate(client, url, alice, p, "style") for p in PROMPTS]
            answers = await asyncio.gather(*attack, *victim)
            for response in answers[: len(attack)]:
                typed = response.json().get("error", {}).get("type") if \
                    response.status_code != 200 else None
                attacks[f"{response.status_code} {typed or ''}".strip()] += 1
            for want, response in zip(before, answers[len(attack):], strict=True):
                victims += 1
                assert response.status_code == 200, response.text
                mismatches += response.json()["text"] != want
        health = (await client.get(f"{url}/health")).status_code
    record("kv_poisoning", upload_attempts=sum(refused.values()), upload_refused=refused[422],
           injected_attack_requests=sum(attacks.values()), attack_outcomes=dict(attacks),
           victim_requests=victims, victim_mismatches=mismatches, health=health)
    assert mismatches == 0 and health == 200
    # The injected records were really served: the +-3e38 one fails its own requests, typed.
    assert attacks["500 non_finite_output"] >= 2 * ROUNDS
    assert set(attacks) <= {"200", "500 non_finite_output"}, attacks
