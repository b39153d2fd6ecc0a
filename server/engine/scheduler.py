"""Who runs this step, and how many of their tokens: admission under a token budget, KV blocks,
preemption. Pure Python, no torch.

Every step is one packed forward of at most `max_tokens` tokens: first one token for each
running request that is decoding (oldest first), then prompt chunks of running requests still
prefilling, then new requests admitted from the wait queue (whose order is the fairness policy's)
while the budget, the running cap and the KV blocks allow. A request whose next tokens need a
block when none is free takes it from a running request, which is preempted: its blocks are freed
and it waits again, first in its tenant's line, to recompute its tokens on return.

The tenant that needs the memory pays for it (`_victim`): a request takes blocks from its own
tenant's newest running request first; only a tenant's newest request may take them from another
tenant, and only from the tenant that holds the most blocks (its newest request), never from a
tenant that holds fewer than its own. So one tenant's growth never preempts a lighter tenant's
request, and the recompute of a preempted request is charged to its own tenant's fairness
counter (`WaitQueue.recomputed`). Preemptions are counted per tenant (`tenant_preemptions`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from server.engine.block_manager import BlockManager, PrefixBlocks
from server.engine.fairness import WaitQueue
from server.engine.request import Request, Status


@dataclass(frozen=True)
class Work:
    """One request's share of a step: own tokens [start, start + length)."""

    request: Request
    start: int  # first own token computed this step (position id = prefix_len + start)
    length: int  # own tokens computed this step (1 when decoding)
    samples: bool  # it reaches the request's last known token, whose logits give the next one

    @classmethod
    def next_tokens(cls, request: Request, length: int) -> Work:
        start = request.num_computed
        return cls(request, start, length, start + length == request.num_tokens)


@dataclass(frozen=True)
class StepPlan:
    work: list[Work] = field(default_factory=list)  # decodes first, then prompt chunks
    new_prefixes: list[PrefixBlocks] = field(default_factory=list)  # K/V to write first
    preempted: list[Request] = field(default_factory=list)
    admitted: list[Request] = field(default_factory=list)  # running for the first time

    @property
    def empty(self) -> bool:
        return not self.work


@dataclass(frozen=True)
class SchedulerLimits:
    max_running: int  # requests running at once
    max_tokens: int  # tokens per step (decode rows + prompt chunks)
    watermark: int = 0  # blocks admission always leaves free
    # Admission also leaves free what running requests need for this many more tokens each (up
    # to their max_new_tokens), so a request admitted now does not force a preemption a few
    # steps later; growth beyond that horizon is met by preemption.
    lookahead: int = 0


class Scheduler:
    def __init__(self, blocks: BlockManager, queue: WaitQueue, limits: SchedulerLimits) -> None:
        if limits.max_running < 1 or limits.max_tokens < limits.max_running:
            raise ValueError("need max_running >= 1 and max_tokens >= max_running")
        self.blocks, self.queue, self.limits = blocks, queue, limits
        self.running: list[Request] = []  # admission order: oldest first
        self.preemptions = 0
        self.tenant_preemptions: Counter[str] = Counter()  # tenant -> its requests preempted
        self.requeued = 0  # preempted requests waiting to run again
        self._tenant_running: Counter[str] = Counter()

    @property
    def has_work(self) -> bool:
        return bool(self.running) or len(self.queue) > 0

    def add(self, request: Request) -> None:
        request.status = Status.WAITING
        self.queue.add(request, self._eligible)

    def schedule(self, now: float) -> StepPlan:
        plan = StepPlan()
        budget = self.limits.max_tokens
        for decoding in (True, False):
            for request in list(self.running):
                if budget == 0:
                    break
                if request.status is Status.RUNNING and (request.tokens_left == 1) == decoding:
                    budget -= self._continue(request, budget, plan)
        growth = sum(self._growth(r) for r in self.running)
        while not plan.preempted and budget and len(self.running) < self.limits.max_running:
            waiting = self.queue.next(self._eligible)
            if waiting is None or not self._admit(waiting, budget, plan, now, growth):
                break
            budget -= plan.work[-1].length
            growth += self._growth(waiting)
        return plan

    def commit(self, plan: StepPlan) -> None:
        """The forward ran: the planned tokens' K/V are in the cache."""
        for work in plan.work:
            work.request.num_computed += work.length

    def generated(self, request: Request) -> None:
        """`request` got one more output token (service for the fairness policy)."""
        self.queue.generated(request, 1)

    def finish(self, request: Request) -> None:
        """Take `request` out, waiting or running, and free what it holds."""
        if request.status is Status.WAITING:
            self.queue.remove(request)
            self.requeued -= request.admitted_at is not None
        elif request.status is Status.RUNNING:
            self._leave(request)
        request.status = Status.FINISHED

    # -- internals ----------------------------------------------------------------------------

    def _continue(self, request: Request, budget: int, plan: StepPlan) -> int:
        """Plan a running request's next tokens, preempting newer ones for blocks if needed."""
        length = min(request.tokens_left, budget)
        while not self.blocks.grow(request.blocks, request.num_computed + length):
            victim = self._victim(request)
            self._preempt(victim, plan)
            if victim is request:
                return 0
        plan.work.append(Work.next_tokens(request, length))
        return length

    def _victim(self, request: Request) -> Request:
        """Whom `request` takes blocks from (the module docstring's rule): its own tenant's
        newest running request; when that is `request` itself, the newest request of the tenant
        holding the most blocks if it holds more than `request`'s tenant, else `request`."""
        tenant = request.tenant.name
        newest: dict[str, Request] = {}  # tenant -> its newest running request
        held: Counter[str] = Counter()  # tenant -> blocks its running requests hold
        for running in self.running:
            newest[running.tenant.name] = running
            held[running.tenant.name] += len(running.blocks)
        if newest[tenant] is not request:
            return newest[tenant]
        heaviest = max(held, key=lambda name: held[name])
        return newest[heaviest] if held[heaviest] > held[tenant] else request

    def _preempt(self, request: Request, plan: StepPlan) -> None:
        refund = [w for w in plan.work if w.request is request]
        for work in refund:
            plan.work.remove(work)
        self._leave(request)
        # Its recompute is service its tenant gets again: charged to it, not to the others.
        self.queue.recomputed(request, request.num_computed)
        request.status, request.num_computed = Status.WAITING, 0
        request.preemptions += 1
        self.preemptions += 1
        self.tenant_preemptions[request.tenant.name] += 1
        plan.preempted.append(request)
        self.requeued += 1
        self.queue.requeue(request)

    def _growth(self, request: Request) -> int:
        """Blocks `request` still needs for its known tokens and `lookahead` more (up to its
        end), beyond those it holds."""
        last = len(request.prompt_ids) + request.sampling.max_new_tokens - 1
        tokens = min(last, request.num_tokens + self.limits.lookahead)
        return max(0, self.blocks.blocks_for(tokens) - len(request.blocks))

    def _admit(
        self, request: Request, budget: int, plan: StepPlan, now: float, growth: int
    ) -> bool:
        """Give `request` its prefix blocks and blocks for its first chunk, if that leaves the
        watermark plus the growth of the running requests (and of this one) free."""
        length = min(request.tokens_left, budget)
        own = self.blocks.blocks_for(length)  # taken now; the rest of its growth is reserved
        reserve = self.limits.watermark + growth + self._growth(request) - own
        prefix = request.spec.prefix
        key = None if prefix is None else (prefix.form, prefix.content_hash, prefix.prefix_len)
        cost = own + (0 if key is None else self.blocks.prefix_cost(key))
        if cost + reserve > self.blocks.num_free:
            return False
        entry = None if key is None else self.blocks.acquire_prefix(key)
        self.blocks.grow(request.blocks, length)
        if entry is not None and not entry.written and entry not in plan.new_prefixes:
            plan.new_prefixes.append(entry)
        if request.admitted_at is None:
            request.admitted_at = now
            plan.admitted.append(request)
        else:
            self.requeued -= 1
        request.prefix, request.status = entry, Status.RUNNING
        self.queue.admitted(request)
        self.running.append(request)
        self._tenant_running[request.tenant.name] += 1
        plan.work.append(Work.next_tokens(request, length))
        return True

    def _leave(self, request: Request) -> None:
        self.running.remove(request)
        self._tenant_running[request.tenant.name] -= 1
        self.blocks.free(request.blocks)
        if request.prefix is not None:
            self.blocks.release_prefix(request.prefix)
            request.prefix = None

    def _eligible(self, request: Request) -> bool:
        cap = request.tenant.max_running
        return cap is None or self._tenant_running[request.tenant.name] < cap
