"""One tenant's prefix cannot change another tenant's outputs, through the real engine.

The attack of issue 17, handed straight to `Engine.submit` (no upload check): a kv-form prefix
whose keys are 0 and whose layer-0 values are the same +-1e38 vector in every slot, and a p_theta
prefix of identical rows at +-3e37; plus the same kv attack at +-3e38, whose requests' own
logits overflow even with normalised attention. Before, their requests wrote non-finite K/V into
their own blocks, and on a small pool those blocks were soon reused by the victim's requests.
The victim's greedy tokens must equal the independent reference (the model's own forward with
the prefix as past K/V) token by token, each attack request fails alone with
`non_finite_output` or gives finite output, and the engine stays alive with no non-finite value
left in its pool (the failed requests' blocks are zeroed).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib

import pytest
import torch

from prefix_registry.fingerprint import ModelFingerprint
from server.engine import EngineRequest, PrefixSource, SamplingParams
from server.engine.block_manager import BlockManager, PrefixKey
from server.engine.config import EngineConfig
from server.engine.memory import plan_pool
from server.engine.request import TenantShare
from server.errors import CorruptPrefixError
from server.models.loader import LoadedModel
from tests.engine.helpers import make_prefix, reference_greedy, running

ROUNDS = 6
ATTACKS_PER_ROUND = 4
POOL_BLOCKS = 48  # of 4 slots: the rounds take far more in all, so blocks are reused


def _hashed(name: str, form: str, tensors: dict[str, torch.Tensor], fp: ModelFingerprint
            ) -> PrefixSource:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(tensors[key].numpy().tobytes())
    length = next(iter(tensors.values())).shape[-2]
    return PrefixSource(digest.hexdigest(), name, 1, form, length, tensors, fp)


def attack_prefixes(loaded: LoadedModel, length: int = 8) -> list[PrefixSource]:
    """The issue's two poisons, kv (keys 0, layer-0 values +-1e38) and p_theta (rows +-3e37),
    and the kv one at +-3e38 (its own output overflows)."""
    fp = loaded.fingerprint
    shape = (fp.num_layers, fp.num_kv_heads, length, fp.head_dim)
    signs = torch.where(torch.arange(fp.head_dim) % 2 == 0, 1.0, -1.0)
    values = torch.zeros(shape)
    values[0] = 1e38 * signs  # the same vector in every slot
    kv = _hashed("evil-kv", "kv", {"keys": torch.zeros(shape), "values": values}, fp)
    row = 3e37 * torch.where(torch.arange(fp.hidden_size) % 2 == 0, 1.0, -1.0)
    p_theta = row.expand(fp.num_layers, length, fp.hidden_size).clone()
    overflowing = _hashed("evil-kv-3e38", "kv", {"keys": torch.zeros(shape), "values": 3 * values},
                          fp)
    return [kv, _hashed("evil-p", "p_theta", {"p_theta": p_theta}, fp), overflowing]


def _greedy(prompt: list[int], n: int, prefix: PrefixSource | None, tenant: str) -> EngineRequest:
    return EngineRequest(prompt, SamplingParams(max_new_tokens=n, ignore_eos=True), prefix,
                         tenant=TenantShare(tenant))


@pytest.mark.usefixtures("one_thread")
async def test_a_poisoning_prefix_never_reaches_another_tenant(load_tiny) -> None:
    loaded = load_tiny("llama")
    attacks = attack_prefixes(loaded)
    victim_prefix = make_prefix(loaded, 5, "p_theta", seed=3, name="victim")
    # Prompts of several lengths, with and without a prefix: last blocks partly used, so stale
    # slots of reused blocks sit right beside the victim's own.
    victims = [([5 + i, 17, 42, 9 + i, 3][: 2 + i % 4], victim_prefix if i % 3 else None)
               for i in range(8)]
    want = [reference_greedy(loaded, prompt, prefix, 10)[0] for prompt, prefix in victims]
    per_block = plan_pool(loaded, EngineConfig(block_size=4)).bytes_per_block
    attempts = failed = mismatches = 0
    async with running(loaded, block_size=4, kv_cache_bytes=POOL_BLOCKS * per_block,
                       max_seq_len=64) as engine:
        for round_ in range(ROUNDS):
            attack = [engine.submit(_greedy([3, 4, 5, 6, 7][: 2 + j], 6,
                                            attacks[(round_ + j) % 3], "mallory"))
                      for j in range(ATTACKS_PER_ROUND)]
            victim = [engine.submit(_greedy(prompt, 10, prefix, "alice"))
                      for prompt, prefix in victims]
            for done in await asyncio.gather(*(s.collect() for s in attack)):
                attempts += 1
                if done.finished.error_type is not None:
                    failed += 1
                    assert done.finished.error_type == "non_finite_output", done.finished
                    assert "evil" in (done.finished.error_message or "")
                else:  # finite output: all its tokens came out
                    assert len(done.token_ids) == 6
            for i, done in enumerate(await asyncio.gather(*(s.collect() for s in victim))):
                assert done.finished.error_type is None, done.finished
                mismatches += done.token_ids != want[i]
        assert engine.alive and engine.stats().kv_blocks_total == POOL_BLOCKS
        used = slice(0, engine.blocks.high_water)  # blocks ever handed out
        assert torch.isfinite(engine.pool.keys[:, used]).all()  # what the attack wrote: zeroed
        assert torch.isfinite(engine.pool.values[:, used]).all()
    assert mismatches == 0
    assert attempts == ROUNDS * ATTACKS_PER_ROUND
    assert failed >= attempts // 3  # at least the +-3e38 ones: the zeroing above was exercised


async def test_a_non_finite_row_fails_alone_in_its_batch(load_tiny) -> None:
    """Poisoned and sane requests in the same steps: only the poisoned ones fail."""
    loaded = load_tiny("llama")
    evil = attack_prefixes(loaded)[2]
    sane = make_prefix(loaded, 8, "kv", seed=4, name="sane")
    prompt = [5, 17, 42, 9]
    want = reference_greedy(loaded, prompt, sane, 8)[0]
    async with running(loaded, block_size=4) as engine:
        streams = [engine.submit(_greedy(prompt, 8, evil if i % 2 else sane, f"t{i}"))
                   for i in range(6)]
        results = await asyncio.gather(*(s.collect() for s in streams))
        assert engine.alive
    for i, done in enumerate(results):
        if i % 2:
            assert done.finished.error_type == "non_finite_output"
        else:
            assert (done.finished.error_type, done.token_ids) == (None, want)


def _corrupt(prefix: PrefixSource) -> list[PrefixSource]:
    keys, values = prefix.tensors["keys"], prefix.tensors["values"]
    return [
        dataclasses.replace(prefix, prefix_len=0),
        dataclasses.replace(prefix, prefix_len=-3),
        dataclasses.replace(prefix, prefix_len=prefix.prefix_len + 1),  # tensors hold fewer
        dataclasses.replace(prefix, tensors={"keys": keys}),
        dataclasses.replace(prefix, tensors={"keys": keys, "values": values[:, :, :2]}),
        dataclasses.replace(prefix, form="lora"),
        dataclasses.replace(prefix, form="p_theta"),  # kv tensors under the wrong form
    ]


async def test_a_prefix_breaking_the_engine_invariants_fails_only_its_request(load_tiny) -> None:
    """A corrupt prefix (e.g. a stored record whose length is 0) is refused at the engine's
    door with a typed server-side error; before, a length of 0 killed the engine (IndexError in
    the block manager) on every restart."""
    loaded = load_tiny("llama")
    good = make_prefix(loaded, 5, "kv", seed=1, name="good")
    prompt = [5, 17, 42]
    async with running(loaded, block_size=4) as engine:
        for corrupt in _corrupt(good):
            with pytest.raises(CorruptPrefixError) as caught:
                engine.submit(_greedy(prompt, 4, corrupt, "t"))
            assert caught.value.type == "corrupt_prefix" and caught.value.status_code == 500
            assert "good" in caught.value.message
        done = await engine.submit(_greedy(prompt, 4, good, "t")).collect()
        assert engine.alive
    assert done.token_ids == reference_greedy(loaded, prompt, good, 4)[0]


def test_the_block_manager_takes_nothing_for_an_empty_prefix() -> None:
    """Defence in depth below the door: no IndexError for a length of 0."""
    blocks = BlockManager(4, 4)
    entry = blocks.acquire_prefix(PrefixKey("kv", "h", 0))
    assert entry is not None and entry.blocks == [] and blocks.num_free == 4
