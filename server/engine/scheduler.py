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
A victim's tokens already planned in the step go back into the step's budget.

The block manager holds every block table; a step's result is a frozen `StepPlan` of plain
data (ids, tokens, positions, block ids), which is all the runner reads.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from server.engine.block_manager import BlockManager, PrefixKey
from server.engine.fairness import WaitQueue
from server.engine.request import Request, Status


@dataclass(frozen=True)
class Work:
    """One request's share of a step, as plain data: the runner reads nothing else.

    Own tokens [start, start + length) are computed; own token `i` has position id
    `prefix_len + i` and lives in slot `i` of `blocks`; the prefix's K/V are in `prefix_blocks`.
    """

    request_id: str
    token_ids: tuple[int, ...]  # own tokens computed this step
    start: int  # first own token computed this step
    blocks: tuple[int, ...]  # its own block table (covers start + length tokens)
    prefix_blocks: tuple[int, ...]  # its prefix's shared blocks (empty without a prefix)
    prefix_len: int
    samples: bool  # it reaches the request's last known token, whose logits give the next one

    @property
    def length(self) -> int:
        """Own tokens computed this step (1 when decoding)."""
        return len(self.token_ids)


@dataclass(frozen=True)
class NewPrefix:
    """A prefix entry new to the pool this step: its K/V are written before the forward."""

    key: PrefixKey
    blocks: tuple[int, ...]
    holders: tuple[str, ...]  # ids of this step's requests that read it


@dataclass(frozen=True)
class StepPlan:
    work: tuple[Work, ...] = ()  # decodes first, then prompt chunks
    new_prefixes: tuple[NewPrefix, ...] = ()  # K/V to write first
    preempted: tuple[str, ...] = ()  # request ids
    admitted: tuple[str, ...] = ()  # request ids running for the first time

    @property
    def empty(self) -> bool:
        return not self.work


@dataclass
class _Draft:
    """A step being planned (mutable; `Scheduler._freeze` turns it into a `StepPlan`)."""

    budget: int
    rows: list[tuple[Request, int]] = field(default_factory=list)  # (request, own tokens)
    new_prefixes: list[PrefixKey] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    admitted: list[str] = field(default_factory=list)

    def plan(self, request: Request, length: int) -> None:
        self.rows.append((request, length))
        self.budget -= length

    def refund(self, request: Request) -> None:
        """Drop `request`'s planned tokens (it was preempted): the budget gets them back."""
        for row in [row for row in self.rows if row[0] is request]:
            self.rows.remove(row)
            self.budget += row[1]


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
        draft = _Draft(self.limits.max_tokens)
        for decoding in (True, False):
            for request in list(self.running):
                if draft.budget == 0:
                    break
                if request.status is Status.RUNNING and (request.tokens_left == 1) == decoding:
                    self._continue(request, draft)
        growth = sum(self._growth(r) for r in self.running)
        while not draft.preempted and draft.budget and len(self.running) < self.limits.max_running:
            waiting = self.queue.next(self._eligible)
            if waiting is None or not self._admit(waiting, draft, now, growth):
                break
            growth += self._growth(waiting)
        return self._freeze(draft)

    def commit(self, plan: StepPlan) -> None:
        """The forward ran: the planned tokens' K/V are in the cache."""
        running = {r.request_id: r for r in self.running}
        for work in plan.work:
            request = running.get(work.request_id)  # gone if it failed during the step
            if request is not None:
                request.num_computed += work.length

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

    def _continue(self, request: Request, draft: _Draft) -> None:
        """Plan a running request's next tokens, preempting newer ones for blocks if needed
        (their planned tokens go back into the budget, which this request may then use)."""
        while True:
            length = min(request.tokens_left, draft.budget)
            if self.blocks.grow(request.request_id, request.num_computed + length):
                return draft.plan(request, length)
            victim = self._victim(request)
            self._preempt(victim, draft)
            if victim is request:
                return

    def _victim(self, request: Request) -> Request:
        """Whom `request` takes blocks from (the module docstring's rule): its own tenant's
        newest running request; when that is `request` itself, the newest request of the tenant
        holding the most blocks if it holds more than `request`'s tenant, else `request`."""
        tenant = request.tenant.name
        newest: dict[str, Request] = {}  # tenant -> its newest running request
        held: Counter[str] = Counter()  # tenant -> blocks its running requests hold
        for running in self.running:
            newest[running.tenant.name] = running
            held[running.tenant.name] += self.blocks.held(running.request_id)
        if newest[tenant] is not request:
            return newest[tenant]
        heaviest = max(held, key=lambda name: held[name])
        return newest[heaviest] if held[heaviest] > held[tenant] else request

    def _preempt(self, request: Request, draft: _Draft) -> None:
        draft.refund(request)
        self._leave(request)
        # Its recompute is service its tenant gets again: charged to it, not to the others.
        self.queue.recomputed(request, request.num_computed)
        request.status, request.num_computed = Status.WAITING, 0
        request.preemptions += 1
        self.preemptions += 1
        self.tenant_preemptions[request.tenant.name] += 1
        draft.preempted.append(request.request_id)
        self.requeued += 1
        self.queue.requeue(request)

    def _growth(self, request: Request) -> int:
        """Blocks `request` still needs for its known tokens and `lookahead` more (up to its
        end), beyond those it holds."""
        last = len(request.prompt_ids) + request.sampling.max_new_tokens - 1
        tokens = min(last, request.num_tokens + self.limits.lookahead)
        return max(0, self.blocks.blocks_for(tokens) - self.blocks.held(request.request_id))

    def _admit(self, request: Request, draft: _Draft, now: float, growth: int) -> bool:
        """Give `request` its prefix blocks and blocks for its first chunk, if that leaves the
        watermark plus the growth of the running requests (and of this one) free."""
        length = min(request.tokens_left, draft.budget)
        own = self.blocks.blocks_for(length)  # taken now; the rest of its growth is reserved
        reserve = self.limits.watermark + growth + self._growth(request) - own
        prefix = request.spec.prefix
        key = None if prefix is None else PrefixKey(prefix.form, prefix.content_hash,
                                                    prefix.prefix_len)
        cost = own + (0 if key is None else self.blocks.prefix_cost(key))
        if cost + reserve > self.blocks.num_free or not self._take(request, key, length):
            return False
        if key is not None and not self.blocks.is_written(key) and key not in draft.new_prefixes:
            draft.new_prefixes.append(key)
        if request.admitted_at is None:
            request.admitted_at = now
            draft.admitted.append(request.request_id)
        else:
            self.requeued -= 1
        request.status = Status.RUNNING
        self.queue.admitted(request)
        self.running.append(request)
        self._tenant_running[request.tenant.name] += 1
        draft.plan(request, length)
        return True

    def _take(self, request: Request, key: PrefixKey | None, length: int) -> bool:
        """Hold `request`'s prefix and blocks for `length` own tokens, all or nothing."""
        rid = request.request_id
        if key is not None and self.blocks.hold_prefix(rid, key) is None:
            return False
        if not self.blocks.grow(rid, length):
            self.blocks.free(rid)
            return False
        return True

    def _leave(self, request: Request) -> None:
        self.running.remove(request)
        self._tenant_running[request.tenant.name] -= 1
        self.blocks.free(request.request_id)

    def _freeze(self, draft: _Draft) -> StepPlan:
        """The draft as plain data, with the block tables as they stand after all growth."""
        work = tuple(self._work(request, length) for request, length in draft.rows)
        new = (self._new_prefix(key, work) for key in draft.new_prefixes)
        return StepPlan(
            work=work,
            new_prefixes=tuple(entry for entry in new if entry.holders),  # not all preempted
            preempted=tuple(draft.preempted), admitted=tuple(draft.admitted),
        )

    def _work(self, request: Request, length: int) -> Work:
        rid, start = request.request_id, request.num_computed
        prefix = self.blocks.prefix_of(rid)
        return Work(
            request_id=rid, token_ids=tuple(request.token_ids(start, start + length)),
            start=start, blocks=self.blocks.table(rid),
            prefix_blocks=tuple(prefix.blocks) if prefix is not None else (),
            prefix_len=request.prefix_len, samples=start + length == request.num_tokens,
        )

    def _new_prefix(self, key: PrefixKey, work: tuple[Work, ...]) -> NewPrefix:
        holders = tuple(w.request_id for w in work if self._holds(w.request_id, key))
        return NewPrefix(key, self.blocks.prefix_blocks(key), holders)

    def _holds(self, request_id: str, key: PrefixKey) -> bool:
        entry = self.blocks.prefix_of(request_id)
        return entry is not None and entry.key == key

    def _eligible(self, request: Request) -> bool:
        cap = request.tenant.max_running
        return cap is None or self._tenant_running[request.tenant.name] < cap
