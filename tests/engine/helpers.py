"""Test helpers: prefixes and the independent reference (the model's own forward, no engine)."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import torch

from server.engine import Engine, EngineConfig, PrefixSource
from server.models.loader import LoadedModel
from server.models.prefix_kv import forward_with_prefix, prefix_kv


def make_prefix(loaded: LoadedModel, length: int, form: str = "p_theta", seed: int = 0,
                name: str = "p") -> PrefixSource:
    """A random prefix of `length` tokens in `form`, hashed like the registry hashes it."""
    fp = loaded.fingerprint
    g = torch.Generator().manual_seed(seed)
    if form == "p_theta":
        tensors = {"p_theta": torch.randn(fp.num_layers, length, fp.hidden_size, generator=g)}
    else:
        shape = (fp.num_layers, fp.num_kv_heads, length, fp.head_dim)
        keys, values = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        tensors = {"keys": keys, "values": values}
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(tensors[key].numpy().tobytes())
    return PrefixSource(digest.hexdigest(), name, 1, form, length, tensors, fp)


@torch.no_grad()
def reference_greedy(
    loaded: LoadedModel, prompt: list[int], prefix: PrefixSource | None, max_new: int
) -> tuple[list[int], torch.Tensor]:
    """Greedy decoding by repeated full forwards with the prefix as past K/V (DynamicCache).

    Returns the tokens and the first step's logits [vocab]."""
    keys = values = None
    if prefix is not None:
        keys, values = prefix_kv(loaded, prefix.form, prefix.tensors)
    ids, first = list(prompt), None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: thread hand-offs cost more than they save
    try:
        for _ in range(max_new):
            logits = forward_with_prefix(loaded, torch.tensor([ids]), None, keys, values)[0, -1]
            first = logits.float() if first is None else first
            ids.append(int(logits.argmax()))
    finally:
        torch.set_num_threads(threads)
    assert first is not None
    return ids[len(prompt):], first


@asynccontextmanager
async def running(loaded: LoadedModel, **config: object) -> AsyncIterator[Engine]:
    """A started engine that is always shut down (and its thread joined) afterwards."""
    engine = Engine(loaded, EngineConfig(**config))  # type: ignore[arg-type]
    engine.start()
    try:
        yield engine
    finally:
        engine.shutdown_now()
