"""The scheduler alone: admission, the prefill token budget, compact slots (no model, no torch)."""

from __future__ import annotations

from server.engine.request import EngineRequest, Request, SamplingParams, Status
from server.engine.scheduler import Move, Scheduler


def _request(rid: str, prompt_len: int, max_new: int = 4) -> Request:
    spec = EngineRequest([1] * prompt_len, SamplingParams(max_new_tokens=max_new))
    return Request(rid, spec, [1] * prompt_len)


def _run_step(s: Scheduler, now: float = 0.0):
    admitted = s.admit(now)
    plan = s.schedule()
    s.commit(plan)
    for chunk in plan.prefill:
        if chunk.request.status is Status.DECODE:
            chunk.request.output_ids.append(7)
    return admitted, plan


def test_prefill_shares_the_token_budget_oldest_first() -> None:
    s = Scheduler(num_slots=4, chunk_tokens=10)
    a, b, c = _request("a", 7), _request("b", 6), _request("c", 3)
    for r in (a, b, c):
        s.add(r)
    admitted, plan = _run_step(s)
    # a (7) and b (6) are admitted; c waits: the step's budget is already spoken for.
    assert admitted == [a, b] and [r.request_id for r in s.waiting] == ["c"]
    assert [(ch.request.request_id, ch.start, ch.length) for ch in plan.prefill] == [
        ("a", 0, 7), ("b", 0, 3)]
    assert a.status is Status.DECODE and b.status is Status.PREFILL and b.num_computed == 3
    admitted, plan = _run_step(s)
    assert admitted == [c]
    assert [(ch.request.request_id, ch.length) for ch in plan.prefill] == [("b", 3), ("c", 3)]
    assert plan.decode == [a] and plan.num_rows == 3
    assert sum(ch.length for ch in plan.prefill) <= 10


def test_long_prompt_is_cut_into_chunks_while_others_decode() -> None:
    s = Scheduler(num_slots=2, chunk_tokens=8)
    short, long = _request("short", 2), _request("long", 30)
    s.add(short)
    _run_step(s)
    s.add(long)
    steps = 0
    while long.status is not Status.DECODE:
        _, plan = _run_step(s)
        steps += 1
        assert plan.decode == [short]
        assert sum(ch.length for ch in plan.prefill) <= 8
    assert steps == 4  # 8 + 8 + 8 + 6


def test_slots_are_bounded_and_stay_compact() -> None:
    s = Scheduler(num_slots=3, chunk_tokens=100)
    reqs = [_request(str(i), 2) for i in range(5)]
    for r in reqs:
        s.add(r)
    _run_step(s)
    assert [r.slot for r in reqs[:3]] == [0, 1, 2] and len(s.waiting) == 2
    # Freeing a middle row moves the last row into the hole (its filled columns).
    assert s.finish(reqs[0]) == Move(src=2, dst=0, length=reqs[2].num_computed)
    assert reqs[2].slot == 0 and s.rows == [reqs[2], reqs[1]]
    assert s.finish(reqs[1]) is None  # the last row: nothing to move
    admitted, _ = _run_step(s)
    assert admitted == reqs[3:] and [r.slot for r in admitted] == [1, 2]
    assert [r.slot for r in s.rows] == [0, 1, 2]


def test_finishing_a_waiting_request_takes_it_out_of_the_queue() -> None:
    s = Scheduler(num_slots=1, chunk_tokens=4)
    a, b = _request("a", 2), _request("b", 2)
    s.add(a)
    s.add(b)
    _run_step(s)
    assert s.finish(b) is None and not s.waiting and b.status is Status.FINISHED
    assert s.finish(b) is None  # twice is harmless
    s.finish(a)
    assert not s.has_work and s.free_slots == 1
