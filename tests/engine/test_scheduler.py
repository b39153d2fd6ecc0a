"""Scheduling decisions with ids and counts only (no model): budget, blocks, preemption."""

from __future__ import annotations

import dataclasses

from server.engine.block_manager import BlockManager
from server.engine.fairness import FifoQueue
from server.engine.request import (
    EngineRequest,
    PrefixSource,
    Request,
    SamplingParams,
    Status,
    TenantShare,
)
from server.engine.scheduler import Scheduler, SchedulerLimits, StepPlan

PREFIX = PrefixSource("hash", "p", 1, "kv", 6, {})


def _request(rid: str, prompt: int, *, prefix: PrefixSource | None = None,
             tenant: TenantShare | None = None) -> Request:
    spec = EngineRequest([1] * prompt, SamplingParams(max_new_tokens=50), prefix,
                         tenant=tenant or TenantShare())
    return Request(rid, spec, [1] * prompt)


def _scheduler(blocks: int = 64, block_size: int = 4, running: int = 8, tokens: int = 16,
               watermark: int = 0, lookahead: int = 0) -> Scheduler:
    return Scheduler(BlockManager(blocks, block_size), FifoQueue(),
                     SchedulerLimits(running, tokens, watermark, lookahead))


def _step(s: Scheduler) -> StepPlan:
    """Schedule, then pretend the forward ran and every sampling request got a token."""
    plan = s.schedule(0.0)
    running = {r.request_id: r for r in s.running}
    s.commit(plan)
    for work in plan.work:
        if work.samples:
            running[work.request_id].output_ids.append(7)
    return plan


def _shares(plan: StepPlan) -> dict[str, int]:
    return {w.request_id: w.length for w in plan.work}


def test_prompts_are_chunked_under_the_token_budget_and_decodes_come_first() -> None:
    s = _scheduler(tokens=16)
    a, b = _request("a", 10), _request("b", 20)
    s.add(a)
    s.add(b)
    assert _shares(_step(s)) == {"a": 10, "b": 6}
    assert a.status is Status.RUNNING and a.output_ids == [7]
    assert _shares(_step(s)) == {"a": 1, "b": 14}  # a decodes first, b's prompt continues
    plan = _step(s)
    assert _shares(plan) == {"a": 1, "b": 1}
    assert [w.start for w in plan.work] == [11, 20]  # own token index fed this step


def test_blocks_grow_with_the_request_and_return_when_it_finishes() -> None:
    s = _scheduler(block_size=4)
    a = _request("a", 3)
    s.add(a)
    _step(s)
    assert s.blocks.table("a") == (0,)
    _step(s)  # token 4 (index 3) still fits block 0
    plan = _step(s)  # index 4 needs a second block
    assert s.blocks.table("a") == (0, 1) and plan.work[0].blocks == (0, 1)
    s.finish(a)
    assert a.status is Status.FINISHED and s.blocks.table("a") == () and s.blocks.num_free == 64


def test_requests_sharing_a_prefix_hold_its_blocks_once() -> None:
    s = _scheduler(block_size=4)
    requests = [_request(f"r{i}", 5, prefix=PREFIX) for i in range(3)]
    for r in requests:
        s.add(r)
    plan = s.schedule(0.0)
    assert len(plan.new_prefixes) == 1  # written once, before the forward
    entry = plan.new_prefixes[0]
    assert entry.holders == ("r0", "r1", "r2") and entry.blocks == (0, 1)
    assert all(w.prefix_blocks == (0, 1) and w.prefix_len == 6 for w in plan.work)
    stats = s.blocks.stats()
    assert stats.prefix == 2 and stats.used == 2 + 3 * 2  # 6-token prefix + 3 x 5 own tokens


def test_the_newest_request_is_preempted_when_blocks_run_out() -> None:
    s = _scheduler(blocks=4, block_size=4, tokens=16)
    old, new = _request("old", 7), _request("new", 7)
    s.add(old)
    s.add(new)
    _step(s)  # 2 blocks each: the pool is full
    assert s.blocks.num_free == 0
    _step(s)  # each writes its 8th token: still in its second block
    plan = _step(s)  # old needs a third block: new gives its blocks back
    assert plan.preempted == ("new",) and _shares(plan) == {"old": 1}
    assert new.status is Status.WAITING and new.num_computed == 0 and s.blocks.held("new") == 0
    assert new.output_ids == [7, 7] and s.preemptions == 1  # its tokens are kept
    s.finish(old)
    plan = s.schedule(0.0)  # back first in line: recomputes prompt and outputs, then samples
    assert _shares(plan) == {"new": 9} and plan.work[0].samples and plan.admitted == ()


def test_a_request_preempts_itself_when_it_is_the_newest() -> None:
    s = _scheduler(blocks=3, block_size=4, tokens=16)
    old, new = _request("old", 8), _request("new", 4)
    s.add(old)
    s.add(new)
    _step(s)
    assert s.blocks.num_free == 0
    plan = _step(s)  # both need a new block; old takes new's
    assert plan.preempted == ("new",) and _shares(plan) == {"old": 1}


def test_admission_keeps_the_watermark_free_and_respects_the_running_cap() -> None:
    s = _scheduler(blocks=5, block_size=4, running=8, watermark=2)
    a, b = _request("a", 8), _request("b", 8)
    s.add(a)
    s.add(b)
    assert _shares(_step(s)) == {"a": 8}  # b would leave fewer than 2 blocks free
    s = _scheduler(running=1)
    a, b = _request("a", 2), _request("b", 2)
    s.add(a)
    s.add(b)
    assert _shares(_step(s)) == {"a": 2}


def test_a_tenant_at_its_running_cap_waits_while_others_are_admitted() -> None:
    s = _scheduler(tokens=32)
    capped = TenantShare("busy", max_running=1)
    a, b = _request("a", 2, tenant=capped), _request("b", 2, tenant=capped)
    c = _request("c", 2, tenant=TenantShare("light"))
    for r in (a, b, c):
        s.add(r)
    assert _shares(_step(s)) == {"a": 2, "c": 2}
    s.finish(a)
    assert _shares(_step(s)) == {"c": 1, "b": 2}


def test_a_cancelled_waiting_request_leaves_the_queue() -> None:
    s = _scheduler(running=1)
    a, b = _request("a", 2), _request("b", 2)
    s.add(a)
    s.add(b)
    _step(s)
    s.finish(b)
    assert len(s.queue) == 0 and b.status is Status.FINISHED
    s.finish(a)
    assert not s.has_work


def test_admission_leaves_room_for_running_requests_to_grow() -> None:
    s = _scheduler(blocks=7, block_size=4, tokens=32, lookahead=8)
    a, b, c = _request("a", 4), _request("b", 4), _request("c", 4)
    for r in (a, b, c):
        s.add(r)
    # Each takes 1 block now and keeps 2 more free for its next 8 tokens: a and b fit (6 of 7);
    # c would leave less than everyone's growth.
    assert _shares(_step(s)) == {"a": 4, "b": 4}
    assert s.blocks.num_free == 5
    s.finish(a)
    assert "c" in _shares(_step(s))


def test_the_lookahead_stops_at_a_request_s_end() -> None:
    s = _scheduler(blocks=4, block_size=4, tokens=32, lookahead=1000)
    short = Request("s", EngineRequest([1] * 3, SamplingParams(max_new_tokens=2)), [1] * 3)
    other = Request("o", EngineRequest([1] * 3, SamplingParams(max_new_tokens=2)), [1] * 3)
    s.add(short)
    s.add(other)
    assert _shares(_step(s)) == {"s": 3, "o": 3}  # 4 tokens each at most: one block each


def test_a_preempted_victim_s_tokens_go_back_into_the_step_s_budget() -> None:
    """The light tenant's prompt chunk needs blocks held by the heavy tenant, whose newest
    request was already planned (a decode): preempting it refunds its token, and the chunk
    grows by it, so the step still computes the whole budget (5 tokens before the refund)."""
    s = _scheduler(blocks=6, block_size=2, running=3, tokens=6)
    heavy, light = TenantShare("heavy"), TenantShare("light")
    for request in (_request("b1", 2, tenant=heavy), _request("b2", 2, tenant=heavy),
                    _request("p", 8, tenant=light)):
        s.add(request)
    assert _shares(_step(s)) == {"b1": 2, "b2": 2, "p": 2}
    plan = _step(s)
    assert plan.preempted == ("b2",)
    assert _shares(plan) == {"b1": 1, "p": 5}
    assert sum(w.length for w in plan.work) == s.limits.max_tokens


class _RefusingBlocks(BlockManager):
    """A pool whose growth fails for one request although admission's arithmetic said it
    fits (what a miscounted reserve would do): admission must check what it got."""

    def __init__(self, refuse: str) -> None:
        super().__init__(64, 4)
        self.refuse = refuse

    def grow(self, request_id: str, tokens: int) -> bool:
        return request_id != self.refuse and super().grow(request_id, tokens)


def test_a_failed_grow_at_admission_leaves_the_request_waiting_and_holding_nothing() -> None:
    s = Scheduler(_RefusingBlocks("b"), FifoQueue(), SchedulerLimits(8, 16))
    a, b = _request("a", 3, prefix=PREFIX), _request("b", 3, prefix=PREFIX)
    s.add(a)
    s.add(b)
    plan = s.schedule(0.0)
    assert _shares(plan) == {"a": 3} and plan.admitted == ("a",)
    assert b.status is Status.WAITING and b not in s.running and len(s.queue) == 1
    assert s.blocks.held("b") == 0 and s.blocks.prefix_of("b") is None
    assert plan.new_prefixes[0].holders == ("a",)
    entry = s.blocks.prefix_of("a")
    assert entry is not None and entry.holders == 1  # b's hold was given back


def _plain(value: object) -> bool:
    if isinstance(value, tuple):
        return all(_plain(item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        frozen = type(value).__dataclass_params__.frozen  # type: ignore[attr-defined]
        return frozen and all(_plain(getattr(value, f.name)) for f in dataclasses.fields(value))
    return isinstance(value, int | str | bool)


def test_the_plan_is_frozen_plain_data_with_no_live_request() -> None:
    """What the runner reads: ids, tokens, positions and block ids, never a `Request` or a
    block list the block manager may still change."""
    s = _scheduler(block_size=4)
    for rid in ("a", "b"):
        s.add(_request(rid, 5, prefix=PREFIX))
    plan = s.schedule(0.0)
    assert plan.work and plan.new_prefixes and _plain(plan)
    assert plan.work[0].token_ids == (1,) * 5 and plan.work[0].blocks == (2, 3)
