"""Fixtures for the registry tests: the real Redis (a random namespace per test, removed after),
the local store in a temp dir, a small model fingerprint and artifact builders."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import torch

from prefix_registry.artifact import PrefixArtifact
from prefix_registry.fingerprint import ModelFingerprint
from prefix_registry.local_store import LocalStore
from prefix_registry.redis_store import RedisStore
from prefix_registry.store import PrefixStore

FP = ModelFingerprint(
    architecture="LlamaForCausalLM", family="llama", num_layers=2, hidden_size=64,
    num_kv_heads=2, head_dim=16, vocab_size=384, digest="ab" * 32,
)


@pytest.fixture
async def redis_store(redis_url: str, namespace: str) -> AsyncIterator[RedisStore]:
    store = RedisStore(redis_url, namespace=namespace)
    yield store
    await store.close()


@pytest.fixture(params=["local", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[PrefixStore]:
    """Each contract test runs against both stores."""
    s: PrefixStore
    if request.param == "local":
        s = LocalStore(tmp_path / "registry")
    else:
        s = RedisStore(request.getfixturevalue("redis_url"),
                       namespace=request.getfixturevalue("namespace"))
    yield s
    await s.close()


def make_tensors(form: str = "kv", prefix_len: int = 3, seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if form == "p_theta":  # [num_layers, prefix_len, d_model]
        seed_shape = (FP.num_layers, prefix_len, FP.hidden_size)
        return {"p_theta": torch.randn(seed_shape, generator=g).to(dtype)}
    shape = (FP.num_layers, FP.num_kv_heads, prefix_len, FP.head_dim)  # each [L, H, P, hd]
    return {"keys": torch.randn(shape, generator=g).to(dtype),
            "values": torch.randn(shape, generator=g).to(dtype)}


MakeArtifact = Callable[..., PrefixArtifact]


@pytest.fixture
def make_artifact() -> MakeArtifact:
    def make(name: str = "style", tenant: str = "acme", *, form: str = "kv", seed: int = 0,
             prefix_len: int = 3, **kwargs: object) -> PrefixArtifact:
        tensors = make_tensors(form, prefix_len, seed)
        return PrefixArtifact.create(name=name, tenant=tenant, tensors=tensors, model=FP,
                                     **kwargs)  # type: ignore[arg-type]
    return make


def closed_port() -> int:
    """A local TCP port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
