"""Paged KV on the real engine: memory per request, shared prefixes, preemption, pool sizing."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch

from server.engine import Engine, EngineConfig, EngineRequest, SamplingParams, memory
from server.engine.config import MiB
from server.engine.memory import plan_pool
from tests.engine.helpers import make_prefix, reference_greedy, running

PROMPT = [5, 17, 42, 9, 88, 3, 120, 7]


def _greedy(prompt: list[int], n: int, prefix=None, rid: str = "") -> EngineRequest:
    return EngineRequest(prompt, SamplingParams(max_new_tokens=n, ignore_eos=True), prefix,
                         request_id=rid)


async def test_a_prefix_is_stored_once_whatever_the_number_of_requests(load_tiny) -> None:
    loaded = load_tiny("llama")
    prefix = make_prefix(loaded, 40, seed=3)  # 3 blocks of 16
    async with running(loaded, block_size=16) as engine:
        streams = [engine.submit(_greedy(PROMPT, 60, prefix)) for _ in range(6)]
        for stream in streams:  # wait until all six run
            await stream.__anext__()
        stats = engine.stats()
        assert stats.running == 6 and stats.kv_blocks_prefix == 3
        own_blocks = stats.kv_blocks_used - stats.kv_blocks_prefix
        assert own_blocks <= 6 * -(-(len(PROMPT) + 60) // 16)  # each its own tokens only
        for stream in streams:
            stream.cancel()
            await stream.collect()
        stats = engine.stats()
        # Nobody holds the prefix now, yet it stays cached: the next request is a hit.
        assert stats.kv_blocks_used == 0 and stats.kv_blocks_prefix == 3
        done = await engine.submit(_greedy(PROMPT, 4, prefix)).collect()
        assert done.token_ids == reference_greedy(loaded, PROMPT, prefix, 4)[0]
        assert (engine.stats().prefix_cache_misses, engine.stats().prefix_cache_hits) == (1, 6)


async def test_preempted_requests_finish_exactly_as_if_never_interrupted(load_tiny) -> None:
    loaded = load_tiny("llama")
    prefixes = [make_prefix(loaded, 12, seed=1), make_prefix(loaded, 5, "kv", seed=2), None]
    requests = [
        _greedy([3 + i, *PROMPT[: 2 + i % 5]], 40 + 3 * i, prefixes[i % 3], rid=f"g{i}")
        for i in range(8)
    ]
    sampled = EngineRequest(PROMPT, SamplingParams(max_new_tokens=40, temperature=1.0, top_p=0.9,
                                                   seed=7, ignore_eos=True), request_id="s")
    async with running(loaded) as engine:
        alone = await engine.submit(dataclasses.replace(sampled, request_id="alone")).collect()
    # 24 blocks of 4 tokens: far less than the requests need at once, more than any one needs.
    per_block = plan_pool(loaded, EngineConfig(block_size=4)).bytes_per_block
    # No lookahead: admit whatever fits now, so growth must preempt.
    async with running(loaded, block_size=4, kv_cache_bytes=24 * per_block, max_seq_len=88,
                       admission_lookahead_tokens=0) as engine:
        results = await asyncio.gather(*(engine.submit(r).collect() for r in [*requests, sampled]))
        stats = engine.stats()
    assert stats.preemptions > 0 and stats.kv_blocks_used == 0
    by_id = {c.request_id: c for c in results}
    for request in requests:
        n = request.sampling.max_new_tokens
        want = reference_greedy(loaded, list(request.prompt), request.prefix, n)[0]
        got = by_id[request.request_id]
        assert got.finished.finish_reason.value == "length"
        assert got.token_ids == want, request.request_id
    assert by_id["s"].token_ids == alone.token_ids  # its own random stream, continued
    # With the default lookahead the same workload runs without a preemption, same tokens.
    async with running(loaded, block_size=4, kv_cache_bytes=24 * per_block,
                       max_seq_len=88) as engine:
        again = await asyncio.gather(*(engine.submit(r).collect() for r in requests))
        assert engine.stats().preemptions == 0
    assert [c.token_ids for c in again] == [by_id[r.request_id].token_ids for r in requests]


async def test_a_long_context_row_beside_short_ones_changes_nothing(load_tiny) -> None:
    loaded = load_tiny("qwen3")  # grouped-query attention: 4 heads over 2 KV heads
    long_prompt = [(7 * i) % 300 + 1 for i in range(200)]
    prefixes = [None, make_prefix(loaded, 13, seed=5)]  # 13 tokens: a partly used prefix block
    # Blocks of 8: the long rows read more than LONG_ROW_BLOCKS blocks, the short ones a few.
    async with running(loaded, max_batch_size=8, max_num_batched_tokens=64,
                       block_size=8) as engine:
        longs = [engine.submit(_greedy(long_prompt, 40, p, rid=f"long{i}"))
                 for i, p in enumerate(prefixes)]
        shorts = [engine.submit(_greedy([9 + i, 4, 2], 12, rid=f"s{i}")) for i in range(5)]
        results = await asyncio.gather(*(s.collect() for s in [*longs, *shorts]))
    for prefix, result in zip(prefixes, results, strict=False):
        assert result.token_ids == reference_greedy(loaded, long_prompt, prefix, 40)[0]
    for i, result in enumerate(results[2:]):
        assert result.token_ids == reference_greedy(loaded, [9 + i, 4, 2], None, 12)[0]


def test_the_pool_is_sized_from_memory_and_capped_by_what_requests_can_use(load_tiny) -> None:
    loaded = load_tiny("llama")
    plan = plan_pool(loaded, EngineConfig(max_batch_size=4, block_size=16))
    per_request = -(-loaded.max_context // 16) + 1
    assert plan.num_blocks == 4 * per_request  # a tiny model: all requests at full length fit
    assert "cpu-kv-fraction" in plan.source and plan.max_seq_len == loaded.max_context
    sized = plan_pool(loaded, EngineConfig(kv_cache_bytes=100 * plan.bytes_per_block))
    assert sized.num_blocks == 100 and "--kv-cache-mb" in sized.describe()


def test_a_budget_too_small_for_one_request_names_the_flags(load_tiny) -> None:
    loaded = load_tiny("llama")
    with pytest.raises(ValueError, match="--kv-cache-mb.*--max-seq-len"):
        Engine(loaded, EngineConfig(kv_cache_bytes=4096))
    engine = Engine(loaded, EngineConfig(kv_cache_bytes=2**20, max_seq_len=64))
    assert engine.pool_plan.max_seq_len == 64


def _shaped(loaded, layers: int, kv_heads: int, head_dim: int, context: int):
    """`loaded` as the pool planner sees a model of another attention shape, in bfloat16."""
    fp = dataclasses.replace(loaded.fingerprint, num_layers=layers, num_kv_heads=kv_heads,
                             head_dim=head_dim)
    return dataclasses.replace(loaded, fingerprint=fp, dtype=torch.bfloat16, max_context=context)


def test_real_model_shapes_are_served_with_the_default_flags(load_tiny) -> None:
    def plan_pool(loaded, config):
        return memory.plan_pool(loaded, config, available_ram=lambda: 16 * 2**30)  # 16 GiB

    qwen3_06b = _shaped(load_tiny("qwen3"), 28, 8, 128, 40960)  # 112 KiB of K/V per token
    plan = plan_pool(qwen3_06b, EngineConfig())
    assert plan.max_seq_len == 40960 and plan.num_blocks * 16 == 74_896  # half of 16 GiB
    assert plan.num_blocks // plan.blocks_for(2048) >= 36  # 36 requests of 2k tokens at once
    # The old default budget (512 MiB) held one 4096-token slot in bfloat16; in blocks it holds
    # eight 512-token requests, or one of 4096.
    small = plan_pool(qwen3_06b, EngineConfig(kv_cache_bytes=512 * MiB, max_seq_len=4096))
    assert small.num_blocks // (small.blocks_for(512) + 1) == 8
    llama3_8b = _shaped(load_tiny("llama"), 32, 8, 128, 8192)  # 128 KiB per token
    assert plan_pool(llama3_8b, EngineConfig()).num_blocks * 16 == 65_536
    with pytest.raises(ValueError, match="--kv-cache-mb .*--max-seq-len"):
        plan_pool(llama3_8b, EngineConfig(kv_cache_bytes=512 * MiB))  # 8192 tokens need 1 GiB
