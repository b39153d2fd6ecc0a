"""`PrefixClient` against the real server (tiny Llama, real engine, real Redis) over real HTTP:
every method, every kind of upload source, generations checked against an independent greedy
decoder that runs the model's own forward (tests/api/helpers.py), and streaming."""

from __future__ import annotations

import tarfile
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from peft import PrefixTuningConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import clients
from server.models.loader import LoadedModel
from tests.api.helpers import decode, prefix_tensors, reference_greedy
from tests.clients.conftest import ADMIN_KEY, LiveServer

PROMPT = "the quick brown fox"


def expected_text(loaded: LoadedModel, n: int, tensors: dict[str, torch.Tensor] | None) -> str:
    return decode(loaded, reference_greedy(loaded, PROMPT, n, tensors))


def test_generate_with_and_without_prefix_matches_reference(
    client: clients.PrefixClient, loaded: LoadedModel
) -> None:
    tensors = prefix_tensors(loaded, "kv", prefix_len=4)
    info = client.upload_prefix("style", tensors, description="kv from memory")
    assert (info.name, info.version, info.tenant, info.form, info.prefix_len) == (
        "style", 1, "acme", "kv", 4)
    out = client.generate("style", PROMPT, max_new_tokens=6)
    assert isinstance(out, clients.Generation)
    assert out.text == expected_text(loaded, 6, tensors)
    assert out.prefix == clients.PrefixRef(id="style", version=1)
    assert out.usage.prefix_tokens == 4 and out.usage.completion_tokens <= 6
    assert out.finish_reason in ("length", "stop") and out.id
    assert out.timings is not None and out.timings.total_s is not None
    base = client.generate(None, PROMPT, max_new_tokens=6)
    assert base.text == expected_text(loaded, 6, None) and base.prefix is None
    assert base.usage.prefix_tokens == 0


def test_stream_yields_deltas_then_result(
    client: clients.PrefixClient, loaded: LoadedModel
) -> None:
    with client.stream(None, PROMPT, max_new_tokens=8) as stream:
        deltas = list(stream)
    assert len(deltas) >= 2 and all(isinstance(d, str) and d for d in deltas)  # one per token
    result = stream.result
    assert "".join(deltas) == result.text == stream.text == expected_text(loaded, 8, None)
    assert result == client.generate(None, PROMPT, max_new_tokens=8).model_copy(
        update={"id": result.id, "timings": result.timings})
    tensors = prefix_tensors(loaded, "p_theta", prefix_len=3, seed=1)
    client.upload_prefix("seed", {"p_theta": tensors["p_theta"].numpy()})
    with client.stream("seed", PROMPT, max_new_tokens=8) as stream:
        assert "".join(stream) == expected_text(loaded, 8, tensors)
    assert stream.result.prefix == clients.PrefixRef(id="seed", version=1)


def test_sampling_arguments_reach_the_server(client: clients.PrefixClient) -> None:
    a = client.generate(None, PROMPT, max_new_tokens=8, temperature=1.5, top_p=0.9, top_k=20,
                        seed=7)
    b = client.generate(None, PROMPT, max_new_tokens=8, temperature=1.5, top_p=0.9, top_k=20,
                        seed=7)
    assert a.text == b.text  # a seed makes sampling reproducible
    assert any(
        client.generate(None, PROMPT, max_new_tokens=8, temperature=1.5, seed=s).text != a.text
        for s in range(8, 12)
    )
    assert client.generate(None, PROMPT, max_new_tokens=3).finish_reason == "length"
    full = client.generate(None, PROMPT, max_new_tokens=8).text
    stop = full[2:4]
    stopped = client.generate(None, PROMPT, max_new_tokens=8, stop=stop)
    assert stopped.finish_reason == "stop" and stopped.text == full[: full.index(stop)]


def test_upload_sources_file_and_bf16_tensor(
    client: clients.PrefixClient, loaded: LoadedModel, tmp_path: Path
) -> None:
    tensors = prefix_tensors(loaded, "kv", prefix_len=2, seed=3)
    path = tmp_path / "raw.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    from_file = client.upload_prefix("raw", path)
    from_memory = client.upload_prefix("raw", tensors)
    assert (from_file.version, from_memory.version) == (1, 1)  # one content: one version
    assert from_file.sha256 == from_memory.sha256  # the same tensor bytes either way
    bf16 = client.upload_prefix("half", {"p_theta": torch.randn(2, 3, 64).bfloat16()})
    assert bf16.dtype == "float32" and bf16.form == "p_theta"


def peft_adapter(model_dir: Path, out: Path, tokens: int) -> dict[str, torch.Tensor]:
    """Save a PEFT PREFIX_TUNING adapter of the tiny model to `out`; return the K/V it holds,
    laid out independently of the server (FACTS: view(T, L, 2, H_kv, hd).permute(1, 2, 3, 0, 4))."""
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    cfg = base.config
    model = get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM",
                                                    num_virtual_tokens=tokens))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # only the prefix's embedding
                p.normal_(0.0, 1.0)
    model.save_pretrained(str(out))
    (weights,) = load_file(out / "adapter_model.safetensors").values()  # [T, L * 2 * H_kv * hd]
    heads, hd = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    kv = weights.view(tokens, cfg.num_hidden_layers, 2, heads, hd).permute(1, 2, 3, 0, 4)
    return {"keys": kv[:, 0].contiguous(), "values": kv[:, 1].contiguous()}


def test_upload_peft_directory_and_archive(
    client: clients.PrefixClient, loaded: LoadedModel, tiny_model_dir: Callable[..., Path],
    tmp_path: Path,
) -> None:
    adapter = tmp_path / "adapter"
    tensors = peft_adapter(tiny_model_dir("llama"), adapter, tokens=5)
    info = client.upload_prefix("peft", adapter)
    assert (info.form, info.prefix_len) == ("kv", 5)
    assert client.generate("peft", PROMPT, max_new_tokens=6).text == \
        expected_text(loaded, 6, tensors)
    archive = tmp_path / "adapter.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(adapter, arcname="adapter")
    assert client.upload_prefix("peft", archive).sha256 == info.sha256


def test_list_follows_every_page(server: LiveServer, client: clients.PrefixClient,
                                 tenant_key: str, loaded: LoadedModel) -> None:
    names = [f"p{i}" for i in range(5)]
    for i, name in enumerate(names):
        client.upload_prefix(name, prefix_tensors(loaded, "kv", prefix_len=1, seed=i))
    client.upload_prefix("p0", prefix_tensors(loaded, "kv", prefix_len=1, seed=9))
    pages: list[httpx.Request] = []
    http = httpx.Client(event_hooks={"request": [pages.append]})
    with clients.PrefixClient(server.url, tenant_key, http_client=http) as paged:
        listed = list(paged.list_prefixes(page_size=2))
    assert sorted(p.name for p in listed) == names and len(pages) == 3
    assert {p.name: p.version for p in listed}["p0"] == 2  # latest versions only
    assert not http.is_closed  # a client we brought is ours to close
    http.close()


def test_get_and_delete(client: clients.PrefixClient, loaded: LoadedModel) -> None:
    for seed in range(3):
        client.upload_prefix("multi", prefix_tensors(loaded, "kv", prefix_len=2, seed=seed))
    detail = client.get_prefix("multi")
    assert isinstance(detail, clients.PrefixDetail) and detail.version == 3
    assert [v.version for v in detail.versions] == [3, 2, 1]
    assert client.delete_prefix("multi", version=2) == 1
    assert [v.version for v in client.get_prefix("multi").versions] == [3, 1]
    assert client.generate("multi@1", PROMPT, max_new_tokens=1).prefix == \
        clients.PrefixRef(id="multi", version=1)
    assert client.delete_prefix("multi") == 2
    with pytest.raises(clients.NotFoundError):
        client.get_prefix("multi")


def test_operator_acts_for_a_tenant(admin: clients.PrefixClient, loaded: LoadedModel) -> None:
    admin.create_tenant("globex")
    tensors = prefix_tensors(loaded, "kv", prefix_len=2)
    assert admin.upload_prefix("shared", tensors, tenant="globex").tenant == "globex"
    assert [p.name for p in admin.list_prefixes(tenant="globex")] == ["shared"]
    assert admin.get_prefix("shared", tenant="globex").tenant == "globex"
    out = admin.generate("shared", PROMPT, max_new_tokens=4, tenant="globex")  # X-Tenant
    assert out.text == expected_text(loaded, 4, tensors)
    with admin.stream("shared", PROMPT, max_new_tokens=4, tenant="globex") as stream:
        assert "".join(stream) == out.text
    with pytest.raises(clients.NotFoundError):  # without it: the operator's default tenant
        admin.generate("shared", PROMPT, max_new_tokens=4)
    assert admin.delete_prefix("shared", tenant="globex") == 1


def test_tenants_and_keys(server: LiveServer, admin: clients.PrefixClient) -> None:
    first = admin.create_tenant("initech")
    assert isinstance(first, clients.ApiKey) and first.name == "initech" and first.api_key
    second = admin.create_key("initech")
    assert second.key_id != first.key_id and second.api_key != first.api_key
    (tenant,) = [t for t in admin.list_tenants() if t.name == "initech"]
    assert {k.key_id for k in tenant.keys} == {first.key_id, second.key_id}
    assert admin.revoke_key("initech", first.key_id) == first.key_id
    with clients.PrefixClient(server.url, second.api_key) as ok:
        assert list(ok.list_prefixes()) == []
    with clients.PrefixClient(server.url, first.api_key) as revoked, \
            pytest.raises(clients.AuthenticationError):
        list(revoked.list_prefixes())


def test_health_ready_request_id_and_env(
    server: LiveServer, tenant_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(clients.BASE_URL_ENV, server.url)
    monkeypatch.setenv(clients.API_KEY_ENV, tenant_key)
    with clients.PrefixClient() as client:  # both from the environment
        assert client.health() == clients.Health(status="ok")
        ready = client.ready()
        assert ready.ok and ready.checks == {"model": "ok", "engine": "ok", "registry": "ok"}
        assert list(client.list_prefixes()) == []  # the tenant key was sent
        with pytest.raises(clients.NotFoundError) as info:
            client.get_prefix("nope", request_id="sdk-req-42")
    assert info.value.request_id == "sdk-req-42"
    with clients.PrefixClient(api_key=ADMIN_KEY) as admin:
        assert admin.base_url == server.url and admin.api_key == ADMIN_KEY


def test_numpy_arrays_and_torch_give_the_same_artifact(
    client: clients.PrefixClient, loaded: LoadedModel
) -> None:
    tensors = prefix_tensors(loaded, "p_theta", prefix_len=2, seed=5)
    a = client.upload_prefix("np", {"p_theta": np.asarray(tensors["p_theta"])})
    b = client.upload_prefix("np", tensors)
    assert a.sha256 == b.sha256 and (a.version, b.version) == (1, 1)  # the same upload
