"""The waiting-queue policies alone (no model, no torch): FIFO and the Virtual Token Counter.

The service tests run a small simulated server: a KV memory of `MEMORY` tokens, requests that
hold their prompt plus their whole output while they run, and one token per running request per
step. Admission follows the paper's loop: take `next()`, stop at the first request that does not
fit. Service is what the server really did: `w_p` per admitted prompt token, `w_q` per token made.
"""

from __future__ import annotations

import ast
import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from server.engine import fairness
from server.engine.fairness import (
    OUTPUT_WEIGHT,
    PROMPT_WEIGHT,
    FifoQueue,
    VirtualTokenCounter,
    WaitQueue,
    make_wait_queue,
)
from server.engine.request import EngineRequest, Request, SamplingParams, TenantShare

MEMORY = 256  # tokens the running batch can hold (the paper's M)
MAX_PROMPT = 48  # the paper's L_input
MAX_OUTPUT = 32
BOUND = 2 * max(PROMPT_WEIGHT * MAX_PROMPT, OUTPUT_WEIGHT * MEMORY)  # Sheng et al., Thm 4.1
_ids = iter(range(10**9))


def _request(tenant: str, prompt: int = 4, output: int = 4, weight: float = 1.0,
             max_running: int | None = None) -> Request:
    share = TenantShare(tenant, weight=weight, max_running=max_running)
    spec = EngineRequest([1] * prompt, SamplingParams(max_new_tokens=output), tenant=share)
    return Request(f"{tenant}-{next(_ids)}", spec, [1] * prompt)


def _admit_all(queue: WaitQueue) -> list[Request]:
    order = []
    while (request := queue.next(lambda r: True)) is not None:
        queue.admitted(request)
        order.append(request)
    return order


@dataclass
class Sim:
    """A server with `MEMORY` tokens of KV and a `queue` policy; `service` is per tenant."""

    queue: WaitQueue
    memory: int = MEMORY
    running: list[list] = field(default_factory=list)  # [request, outputs left]
    service: dict[str, float] = field(default_factory=dict)  # weighted tokens served
    history: list[dict[str, float]] = field(default_factory=list)  # service after each step

    @property
    def used(self) -> int:
        return sum(len(r.prompt_ids) + r.sampling.max_new_tokens for r, _ in self.running)

    def step(self) -> None:
        while (request := self.queue.next(lambda r: True)) is not None:
            need = len(request.prompt_ids) + request.sampling.max_new_tokens
            if need > self.memory - self.used:
                break
            self.queue.admitted(request)
            self._serve(request, PROMPT_WEIGHT * len(request.prompt_ids))
            self.running.append([request, request.sampling.max_new_tokens])
        for item in self.running:
            self.queue.generated(item[0], 1)
            self._serve(item[0], OUTPUT_WEIGHT)
            item[1] -= 1
        self.running = [item for item in self.running if item[1] > 0]
        self.history.append(dict(self.service))

    def _serve(self, request: Request, amount: float) -> None:
        tenant = request.spec.tenant.name
        self.service[tenant] = self.service.get(tenant, 0.0) + amount


def _keep_backlogged(sim: Sim, rng: random.Random, tenant: str, depth: int = 64,
                     weight: float = 1.0, prompt: tuple[int, int] = (1, MAX_PROMPT),
                     output: tuple[int, int] = (1, MAX_OUTPUT)) -> None:
    """Top `tenant`'s queue up to `depth` requests. Once it has arrived, it must never have
    drained in between (the bound is about tenants that stay backlogged)."""
    if tenant in sim.service:
        assert sim.queue.waiting(tenant) > 0, f"{tenant} stopped being backlogged"
    while sim.queue.waiting(tenant) < depth:
        sim.queue.add(_request(tenant, rng.randint(*prompt), rng.randint(*output), weight))


def _gap(sim: Sim, f: str, g: str, start: int = 0, wf: float = 1.0, wg: float = 1.0) -> float:
    """The largest |W_f(t1, t2)/w_f - W_g(t1, t2)/w_g| over all step windows from `start`."""
    diffs = [h.get(f, 0.0) / wf - h.get(g, 0.0) / wg for h in sim.history[start:]]
    return max(diffs) - min(diffs)


# --- order ------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["vtc", "fifo"])
def test_with_one_tenant_the_order_is_arrival_order(policy: str) -> None:
    queue = make_wait_queue(policy)
    rng = random.Random(0)
    requests = [_request("solo", rng.randint(1, 40), rng.randint(1, 20)) for _ in range(30)]
    for r in requests[:10]:
        queue.add(r)
    order = []
    for r in requests[10:]:  # arrivals interleave with admissions and charges
        first = queue.next(lambda r: True)
        assert first is not None
        queue.admitted(first)
        queue.generated(first, 3)
        order.append(first)
        queue.add(r)
    order += _admit_all(queue)
    assert order == requests and len(queue) == 0


def test_vtc_admits_the_least_served_tenant_first() -> None:
    queue = VirtualTokenCounter()
    heavy = [_request("heavy", prompt=40) for _ in range(3)]
    light = [_request("light", prompt=2) for _ in range(3)]
    for r in heavy + light:
        queue.add(r)
    # heavy (arrived first) goes first; then light until it has caught up on service.
    order = [r.request_id.split("-")[0] for r in _admit_all(queue)]
    assert order == ["heavy", "light", "light", "light", "heavy", "heavy"]
    assert queue.counters() == {"heavy": 120.0, "light": 6.0}


def test_fifo_admits_in_arrival_order_across_tenants() -> None:
    queue = FifoQueue()
    requests = [_request(t, prompt=p) for t, p in
                [("a", 40), ("a", 40), ("b", 1), ("a", 40), ("b", 1)]]
    for r in requests:
        queue.add(r)
    assert _admit_all(queue) == requests
    assert queue.counters() == {"a": 120.0, "b": 2.0}  # service is counted all the same


# --- service: the VTC bound ---------------------------------------------------------------------


def test_two_backlogged_tenants_stay_within_the_vtc_bound() -> None:
    rng = random.Random(1)
    sim = Sim(VirtualTokenCounter())
    for _ in range(3000):
        # "long" sends long prompts and outputs, "short" short ones: very different costs.
        _keep_backlogged(sim, rng, "long", prompt=(32, MAX_PROMPT), output=(16, MAX_OUTPUT))
        _keep_backlogged(sim, rng, "short", prompt=(1, 4), output=(1, 4))
        sim.step()
    assert sim.service["long"] > 20 * BOUND and sim.service["short"] > 20 * BOUND
    assert _gap(sim, "long", "short") <= BOUND


def test_fifo_breaks_the_bound_under_a_flood() -> None:
    """The same measure fails for FIFO when one tenant queues a backlog first."""
    rng = random.Random(2)
    sim = Sim(FifoQueue())
    _keep_backlogged(sim, rng, "flood", depth=200)
    for _ in range(300):  # the light tenant is never admitted: all 300 steps go to the flood
        _keep_backlogged(sim, rng, "light", depth=2)
        sim.step()
    assert _gap(sim, "flood", "light") > 4 * BOUND


def test_weights_give_proportional_shares() -> None:
    rng = random.Random(3)
    sim = Sim(VirtualTokenCounter())
    for _ in range(3000):
        _keep_backlogged(sim, rng, "gold", weight=2.0)
        _keep_backlogged(sim, rng, "basic", weight=1.0)
        sim.step()
    share = sim.service["gold"] / sim.service["basic"]
    assert share == pytest.approx(2.0, rel=0.05)
    # The bound per unit of weight: charges are divided by the weight.
    assert _gap(sim, "gold", "basic", wf=2.0, wg=1.0) <= BOUND / 1.0
    counters = sim.queue.counters()
    assert abs(counters["gold"] - counters["basic"]) <= BOUND


class _NoLift(VirtualTokenCounter):
    """VTC without the lift on arrival: what the lift is for."""

    def _lift(self, tenant: str, eligible: fairness.Eligible) -> None:
        pass


def _late_arrival(queue: WaitQueue) -> tuple[Sim, int, float]:
    """"early" is served alone for 300 steps, then "late" arrives and both stay backlogged."""
    rng = random.Random(4)
    sim = Sim(queue)
    for _ in range(300):
        _keep_backlogged(sim, rng, "early")
        sim.step()
    floor = min(sim.queue.counters().values())
    start = len(sim.history)
    for _ in range(3000):
        _keep_backlogged(sim, rng, "early")
        _keep_backlogged(sim, rng, "late")
        sim.step()
    return sim, start, floor


def test_an_idle_tenant_does_not_bank_credit() -> None:
    sim, start, floor = _late_arrival(VirtualTokenCounter())
    assert sim.queue.counters()["late"] >= floor  # lifted on arrival
    # From the late tenant's arrival on, the two share within the bound: "early" is not starved
    # while "late" catches up on 300 steps of service it never asked for.
    assert _gap(sim, "early", "late", start=start) <= BOUND
    assert sim.history[-1]["early"] - sim.history[start - 1]["early"] > 10 * BOUND
    unlifted, start, _ = _late_arrival(_NoLift())
    assert _gap(unlifted, "early", "late", start=start) > 2 * BOUND


def test_a_returning_tenant_keeps_its_own_counter_when_higher() -> None:
    queue = VirtualTokenCounter()
    big = _request("big", prompt=100)
    queue.add(big)
    queue.admitted(big)  # big: 100, nothing waits
    small = _request("small", prompt=1)
    queue.add(small)  # lifted to the last admitted tenant's counter (nobody is backlogged)
    assert queue.counters()["small"] == 100.0
    queue.admitted(small)  # small: 101
    queue.add(_request("big"))  # big (100) is not backlogged; nobody else waits: max(100, 101)
    assert queue.counters()["big"] == 101.0
    queue.add(_request("small"))  # small is not backlogged; its own 101 >= big's 101
    assert queue.counters() == {"big": 101.0, "small": 101.0}


def test_a_tenant_that_waits_keeps_waiting_without_a_lift() -> None:
    queue = VirtualTokenCounter()
    a1, b1, b2 = _request("a", prompt=10), _request("b", prompt=1), _request("b", prompt=1)
    queue.add(a1)
    queue.admitted(a1)  # a: 10
    queue.add(b1)  # b lifted to 10 (a was admitted last)
    queue.add(b2)  # b is backlogged: no lift
    queue.admitted(b1)
    assert queue.counters()["b"] == 11.0 and queue.waiting("b") == 1



def test_a_tenant_at_its_running_cap_sets_no_floor_for_a_newcomer() -> None:
    """A capped tenant's counter lags by design; lifting a newcomer only to it would bank the
    newcomer credit against the tenants it really competes with."""
    queue = VirtualTokenCounter()
    capped = [_request("capped", prompt=10, max_running=1) for _ in range(2)]
    busy = [_request("busy", prompt=50) for _ in range(2)]
    for r in (*capped, *busy):
        queue.add(r)
    queue.admitted(capped[0])  # capped: 10, at its cap, one more waiting
    queue.admitted(busy[0])  # busy: 50, one more waiting

    def below_cap(r: Request) -> bool:
        return r.spec.tenant.name != "capped"

    new, uncapped = _request("new"), _request("uncapped")
    queue.add(new, below_cap)
    assert queue.counters()["new"] == 50.0  # busy's, not capped's 10
    queue.add(uncapped)  # a queue told of no caps: the least backlogged counter
    assert queue.counters()["uncapped"] == 10.0
    queue.remove(new)
    queue.remove(uncapped)
    queue.admitted(busy[1])  # busy: 100; now only capped waits
    queue.add(_request("last"), below_cap)  # no one competes: the last admitted tenant's
    assert queue.counters()["last"] == 100.0

# --- requeue, remove, eligibility ---------------------------------------------------------------


@pytest.mark.parametrize("policy", ["vtc", "fifo"])
def test_requeue_goes_first_and_is_not_charged_again(policy: str) -> None:
    queue = make_wait_queue(policy)
    first, second, other = _request("a", prompt=8), _request("a", prompt=8), _request("b")
    for r in (first, second):
        queue.add(r)
    queue.admitted(first)
    queue.generated(first, 2)
    queue.add(other)
    before = queue.counters()["a"]
    queue.requeue(first)  # preempted
    assert queue.waiting("a") == 2 and len(queue) == 3
    if policy == "fifo":
        assert queue.next(lambda r: True) is first  # first overall
    else:
        assert queue.next(lambda r: r.spec.tenant.name == "a") is first  # first in its line
    queue.admitted(first)
    assert queue.counters()["a"] == before  # its prompt was paid for once
    queue.admitted(second)
    assert queue.counters()["a"] == before + 8


@pytest.mark.parametrize("policy", ["vtc", "fifo"])
def test_remove_takes_a_waiting_request_out(policy: str) -> None:
    queue = make_wait_queue(policy)
    a1, a2, b1 = _request("a"), _request("a"), _request("b")
    for r in (a1, a2, b1):
        queue.add(r)
    queue.remove(a1)
    queue.remove(a1)  # twice, or an unknown request: nothing happens
    queue.remove(_request("c"))
    assert len(queue) == 2 and queue.waiting("a") == 1 and queue.waiting("c") == 0
    assert _admit_all(queue) == [a2, b1]
    with pytest.raises(ValueError, match="not waiting"):
        queue.admitted(a1)


def test_a_removed_tenant_is_lifted_when_it_comes_back() -> None:
    queue = VirtualTokenCounter()
    a1, b1 = _request("a", prompt=50), _request("b", prompt=1)
    queue.add(a1)
    queue.add(b1)
    queue.remove(b1)  # b no longer waits: it is not backlogged
    queue.admitted(a1)  # a: 50
    queue.add(_request("a"))
    queue.add(_request("b"))  # b comes back: lifted to a's 50
    assert queue.counters() == {"a": 50.0, "b": 50.0}


@pytest.mark.parametrize("policy", ["vtc", "fifo"])
def test_ineligible_tenants_are_skipped_in_their_own_order(policy: str) -> None:
    queue = make_wait_queue(policy)
    capped = [_request("capped", max_running=1) for _ in range(3)]
    free = [_request("free") for _ in range(2)]
    for r in capped + free:
        queue.add(r)
    running = {"capped": 1}  # capped is at its cap

    def below_cap(r: Request) -> bool:
        cap = r.spec.tenant.max_running
        return cap is None or running.get(r.spec.tenant.name, 0) < cap

    assert queue.next(below_cap) is free[0]
    queue.admitted(free[0])
    assert queue.next(below_cap) is free[1]
    queue.admitted(free[1])
    assert queue.next(below_cap) is None  # the rest is capped: nothing, but not lost
    running["capped"] = 0
    assert queue.next(below_cap) is capped[0]  # never a later request of that tenant first
    # A predicate that refuses one request refuses its tenant's later ones too.
    assert queue.next(lambda r: r is not capped[0]) is None


def test_counters_and_waiting_report_per_tenant() -> None:
    queue = VirtualTokenCounter(prompt_weight=0.5, output_weight=3.0)
    r = _request("acme", prompt=10, weight=2.0)
    queue.add(r)
    assert queue.waiting("acme") == 1 and len(queue) == 1
    queue.admitted(r)
    queue.generated(r, 4)
    # (0.5 * 10 + 3 * 4) / weight 2
    assert queue.counters() == {"acme": pytest.approx(8.5)}
    assert queue.waiting("acme") == 0 and len(queue) == 0


def test_the_newest_request_sets_the_tenant_weight() -> None:
    queue = VirtualTokenCounter()
    old = _request("t", prompt=10, weight=1.0)
    queue.add(old)
    queue.add(_request("t", prompt=10, weight=5.0))  # the operator raised the weight
    queue.admitted(old)
    assert queue.counters()["t"] == pytest.approx(2.0)  # 10 / 5


def test_bad_weights_and_policies_are_refused() -> None:
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="weight"):
            VirtualTokenCounter().add(_request("t", weight=bad))
    with pytest.raises(ValueError, match="output_weight"):
        VirtualTokenCounter(output_weight=-1)
    with pytest.raises(ValueError, match="unknown fairness policy"):
        make_wait_queue("lottery")
    assert isinstance(make_wait_queue("fifo"), FifoQueue)
    queue = FifoQueue()
    r = _request("t")
    queue.add(r)
    with pytest.raises(ValueError, match="already waiting"):
        queue.add(r)


def test_the_module_imports_no_torch() -> None:
    tree = ast.parse(Path(fairness.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any(name.split(".")[0] == "torch" for name in imported), imported
