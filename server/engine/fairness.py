"""Who is admitted next: the waiting-queue policies the scheduler admits from (no torch).

Two policies behind one interface, `WaitQueue`:

- `FifoQueue`: arrival order across all tenants.
- `VirtualTokenCounter` (VTC; Sheng et al., "Fairness in Serving Large Language Models",
  OSDI 2024): each tenant has a counter of the service it received, in weighted tokens divided
  by the tenant's weight; the next request comes from the backlogged tenant with the least
  counter. A tenant that becomes backlogged again is lifted to the least counter of the
  backlogged tenants (or, when none is, to the counter of the tenant admitted last), so idle
  time banks no credit. With one tenant it is FIFO. Two tenants that stay backlogged over an
  interval receive service within `2 * max(prompt_weight * L_prompt, output_weight * M)` of
  each other (per unit of weight), where `L_prompt` is the longest prompt and `M` the most
  tokens the running batch can hold. A tenant at its running cap (not `eligible`) sets no
  floor for the lift: its counter lags by design, and a newcomer lifted only to it would take
  every free slot from the tenants it competes with until it caught up.

Service is counted in weighted tokens: `prompt_weight` per prompt token (charged when the request
is admitted) plus `output_weight` per generated token (charged as tokens are made), divided by
the tenant's `TenantShare.weight`. The defaults (1 and 2) are the paper's: an output token costs
about twice a prompt token (it needs its own forward step, while a prompt is computed in bulk).

The scheduler's side of the contract, per request:
`add(request, eligible)` on arrival -> `next(eligible)` to peek -> `admitted` when it takes the
request -> `generated` for every token it makes; `recomputed` and `requeue` when it is preempted
(the tokens it must compute again are charged to its tenant at `prompt_weight`, and it goes back
first in its tenant's line without a new charge for its prompt); `remove` when it is cancelled
while waiting.

Charging the recompute keeps preemption churn inside the bound: a tenant whose growth forces
preemptions (the scheduler preempts within the tenant that needs the memory, or the tenant that
holds the most) pays for the work done twice, so it is not served again ahead of the others.
`eligible` is meant per tenant (e.g. "below its running cap"): a tenant's requests are offered
in its own order, so a tenant's later request never overtakes its earlier one.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Literal, Protocol

from server.engine.request import Request, TenantShare

PROMPT_WEIGHT = 1.0  # service per prompt token (the paper's w_p)
OUTPUT_WEIGHT = 2.0  # service per generated token (the paper's w_q)
Policy = Literal["vtc", "fifo"]
POLICIES: tuple[Policy, ...] = ("vtc", "fifo")

Eligible = Callable[[Request], bool]


def anyone(request: Request) -> bool:
    """The eligibility of a queue without caps: every request may be admitted."""
    return True


class WaitQueue(Protocol):
    """The requests waiting for admission, and the order they are admitted in."""

    def add(self, request: Request, eligible: Eligible = anyone) -> None:
        """A new arrival joins the end of its tenant's line; `eligible` is what `next` will be
        asked with (it tells which waiting tenants compete for admission now)."""
        ...

    def requeue(self, request: Request) -> None:
        """A preempted request returns first in its tenant's line, without a new charge."""
        ...

    def remove(self, request: Request) -> None:
        """A waiting request leaves without running (cancelled); unknown requests are ignored."""
        ...

    def next(self, eligible: Eligible) -> Request | None:
        """The request to admit next among those `eligible`, without removing it."""
        ...

    def admitted(self, request: Request) -> None:
        """`request` leaves the queue to run (its prompt is charged)."""
        ...

    def generated(self, request: Request, tokens: int) -> None:
        """`request`, running, made `tokens` more output tokens (they are charged)."""
        ...

    def recomputed(self, request: Request, tokens: int) -> None:
        """`request` was preempted with `tokens` computed: it computes them again, charged to
        its tenant at the prompt weight (they are computed in bulk, like a prompt)."""
        ...

    def __len__(self) -> int: ...

    def waiting(self, tenant: str) -> int:
        """How many of `tenant`'s requests wait."""
        ...

    def counters(self) -> dict[str, float]:
        """Tenant -> virtual service counter (weighted tokens per unit of weight)."""
        ...


def check_share(share: TenantShare) -> None:
    """Refuse a share the policies cannot use (call before a request enters the queue)."""
    if not (math.isfinite(share.weight) and share.weight > 0):
        raise ValueError(f"tenant weight must be a positive number, got {share.weight!r}")


def make_wait_queue(
    policy: str = "vtc", prompt_weight: float = PROMPT_WEIGHT,
    output_weight: float = OUTPUT_WEIGHT,
) -> WaitQueue:
    """The waiting queue for a policy name (`EngineConfig.fairness`: "vtc" or "fifo") and the
    service weights (`EngineConfig.fair_prompt_weight`, `fair_output_weight`)."""
    if policy == "vtc":
        return VirtualTokenCounter(prompt_weight, output_weight)
    if policy == "fifo":
        return FifoQueue(prompt_weight, output_weight)
    raise ValueError(f"unknown fairness policy {policy!r}: use one of {', '.join(POLICIES)}")


def _tenant(request: Request) -> str:
    return request.spec.tenant.name


class _Queue:
    """What both policies share: membership, and each tenant's service counter and share."""

    def __init__(self, prompt_weight: float, output_weight: float) -> None:
        for name, value in (("prompt_weight", prompt_weight), ("output_weight", output_weight)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        self.prompt_weight = prompt_weight
        self.output_weight = output_weight
        self._counters: dict[str, float] = {}  # tenant -> weighted tokens / weight
        self._shares: dict[str, TenantShare] = {}  # tenant -> its newest request's share
        self._requeued: set[Request] = set()  # preempted: their prompt is already paid for
        self._members: set[Request] = set()

    def remove(self, request: Request) -> None:
        if request in self._members:
            self._leave(request)
            self._requeued.discard(request)

    def admitted(self, request: Request) -> None:
        if request not in self._members:
            raise ValueError(f"request {request.request_id!r} is not waiting")
        self._leave(request)
        if request in self._requeued:
            self._requeued.discard(request)
        else:
            self._charge(request, self.prompt_weight * len(request.prompt_ids))

    def generated(self, request: Request, tokens: int) -> None:
        if tokens < 0:
            raise ValueError(f"generated tokens must be >= 0, got {tokens}")
        self._charge(request, self.output_weight * tokens)

    def recomputed(self, request: Request, tokens: int) -> None:
        if tokens < 0:
            raise ValueError(f"recomputed tokens must be >= 0, got {tokens}")
        self._charge(request, self.prompt_weight * tokens)

    def __len__(self) -> int:
        return len(self._members)

    def counters(self) -> dict[str, float]:
        return dict(self._counters)

    def _enter(self, request: Request, *, requeued: bool = False) -> str:
        """Make `request` a member; a new arrival's share becomes its tenant's share."""
        if request in self._members:
            raise ValueError(f"request {request.request_id!r} is already waiting")
        tenant = _tenant(request)
        if requeued:
            self._requeued.add(request)
        else:
            check_share(request.spec.tenant)
            self._shares[tenant] = request.spec.tenant
            self._counters.setdefault(tenant, 0.0)
        self._members.add(request)
        return tenant

    def _leave(self, request: Request) -> None:
        raise NotImplementedError

    def _charge(self, request: Request, service: float) -> None:
        tenant = _tenant(request)
        weight = self._shares.get(tenant, request.spec.tenant).weight
        self._counters[tenant] = self._counters.get(tenant, 0.0) + service / weight


class FifoQueue(_Queue):
    """Arrival order across all tenants (a requeued request goes first overall).

    It counts each tenant's service like VTC does (without lifting), only for reporting.
    """

    def __init__(
        self, prompt_weight: float = PROMPT_WEIGHT, output_weight: float = OUTPUT_WEIGHT
    ) -> None:
        super().__init__(prompt_weight, output_weight)
        self._queue: deque[Request] = deque()
        self._per_tenant: dict[str, int] = {}

    def add(self, request: Request, eligible: Eligible = anyone) -> None:
        self._count(self._enter(request), +1)
        self._queue.append(request)

    def requeue(self, request: Request) -> None:
        self._count(self._enter(request, requeued=True), +1)
        self._queue.appendleft(request)

    def next(self, eligible: Eligible) -> Request | None:
        blocked: set[str] = set()  # tenants whose oldest waiting request is not eligible
        for request in self._queue:
            tenant = _tenant(request)
            if tenant in blocked:
                continue
            if eligible(request):
                return request
            blocked.add(tenant)
        return None

    def waiting(self, tenant: str) -> int:
        return self._per_tenant.get(tenant, 0)

    def _count(self, tenant: str, delta: int) -> None:
        count = self._per_tenant.get(tenant, 0) + delta
        if count:
            self._per_tenant[tenant] = count
        else:
            del self._per_tenant[tenant]

    def _leave(self, request: Request) -> None:
        if self._queue[0] is request:
            self._queue.popleft()
        else:
            self._queue.remove(request)
        self._members.discard(request)
        self._count(_tenant(request), -1)


class VirtualTokenCounter(_Queue):
    """Token-fair admission: the least-served backlogged tenant goes first (module docstring)."""

    def __init__(
        self, prompt_weight: float = PROMPT_WEIGHT, output_weight: float = OUTPUT_WEIGHT
    ) -> None:
        super().__init__(prompt_weight, output_weight)
        self._lines: dict[str, deque[Request]] = {}  # backlogged tenants only, oldest first
        self._last: str | None = None  # the tenant admitted last (the paper's `l`)

    def add(self, request: Request, eligible: Eligible = anyone) -> None:
        tenant = self._enter(request)
        if tenant not in self._lines:
            self._lift(tenant, eligible)
            self._lines[tenant] = deque()
        self._lines[tenant].append(request)

    def requeue(self, request: Request) -> None:
        # No lift: the tenant was being served, so its counter is current.
        tenant = self._enter(request, requeued=True)
        self._lines.setdefault(tenant, deque()).appendleft(request)

    def next(self, eligible: Eligible) -> Request | None:
        counters = self._counters
        # Least counter first; on a tie, the tenant whose oldest request came first.
        order = sorted(self._lines.items(), key=lambda item: (counters.get(item[0], 0.0),
                                                              item[1][0].arrival))
        for _, line in order:
            if eligible(line[0]):
                return line[0]
        return None

    def admitted(self, request: Request) -> None:
        super().admitted(request)
        self._last = _tenant(request)

    def waiting(self, tenant: str) -> int:
        line = self._lines.get(tenant)
        return len(line) if line is not None else 0

    def _lift(self, tenant: str, eligible: Eligible) -> None:
        """A tenant that was not backlogged starts at the least counter of the backlogged
        tenants that may be admitted now (or the last admitted tenant's when there are none),
        unless its own is higher."""
        counters = self._counters
        competing = [counters.get(t, 0.0) for t, line in self._lines.items() if eligible(line[0])]
        if competing:
            floor = min(competing)
        elif self._last is not None:
            floor = counters.get(self._last, 0.0)
        else:
            floor = 0.0
        counters[tenant] = max(counters.get(tenant, 0.0), floor)

    def _leave(self, request: Request) -> None:
        tenant = _tenant(request)
        line = self._lines[tenant]
        if line[0] is request:
            line.popleft()
        else:
            line.remove(request)
        if not line:
            del self._lines[tenant]
        self._members.discard(request)
