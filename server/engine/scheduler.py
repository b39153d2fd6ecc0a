"""Who runs this step: admission, the prefill token budget, slot layout. Pure Python, no torch.

The scheduler decides with requests, ids and counts; the runner turns its `StepPlan` into tensors
and the KV pool executes its `Move`s. Running requests always occupy the pool rows `[0, n)` (the
slot table is kept compact), so the decode forward reads one contiguous slice of the pool.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from server.engine.request import Request, Status


@dataclass(frozen=True)
class PrefillChunk:
    request: Request
    start: int  # first slot column written (= position id of the chunk's first token)
    length: int  # prompt tokens computed by this chunk

    @property
    def completes_prompt(self) -> bool:
        return self.length == self.request.prompt_left


@dataclass(frozen=True)
class StepPlan:
    num_rows: int  # decode runs over pool rows [0, num_rows); rows still prefilling are masked
    decode: list[Request] = field(default_factory=list)  # each feeds back its last token
    prefill: list[PrefillChunk] = field(default_factory=list)  # <= chunk_tokens tokens in all

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill


@dataclass(frozen=True)
class Move:
    """Copy the first `length` columns of pool row `src` into row `dst` (compaction)."""

    src: int
    dst: int
    length: int


class Scheduler:
    """FIFO admission into a fixed number of KV slots, chunked prefill under a token budget."""

    def __init__(self, num_slots: int, chunk_tokens: int) -> None:
        if num_slots < 1 or chunk_tokens < 1:
            raise ValueError("num_slots and chunk_tokens must be >= 1")
        self.num_slots = num_slots
        self.chunk_tokens = chunk_tokens
        self.waiting: deque[Request] = deque()  # arrival order; holds no slot
        self.rows: list[Request] = []  # rows[i] holds pool row i; always compact

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.rows)

    @property
    def free_slots(self) -> int:
        return self.num_slots - len(self.rows)

    def add(self, request: Request) -> None:
        request.status = Status.WAITING
        self.waiting.append(request)

    def admit(self, now: float) -> list[Request]:
        """Give slots to waiting requests (FIFO) while some are free and this step's prefill
        budget is not already spoken for; the caller then places each one's prefix K/V."""
        admitted: list[Request] = []
        while self.waiting and self.free_slots and self._pending_prefill() < self.chunk_tokens:
            request = self.waiting.popleft()
            request.status, request.slot, request.admitted_at = Status.PREFILL, len(self.rows), now
            self.rows.append(request)
            admitted.append(request)
        return admitted

    def schedule(self) -> StepPlan:
        """Every decoding request feeds one token; prefilling requests (oldest first) share
        `chunk_tokens` prompt tokens."""
        decode = [r for r in self.rows if r.status is Status.DECODE]
        budget, chunks = self.chunk_tokens, []
        for request in self._prefilling():
            if budget == 0:
                break
            length = min(request.prompt_left, budget)
            chunks.append(PrefillChunk(request, request.num_computed, length))
            budget -= length
        return StepPlan(num_rows=len(self.rows), decode=decode, prefill=chunks)

    def commit(self, plan: StepPlan) -> None:
        """Record what the run computed: columns filled, prompts completed."""
        for request in plan.decode:
            request.num_computed += 1
        for chunk in plan.prefill:
            chunk.request.num_computed += chunk.length
            if chunk.request.prompt_left == 0:
                chunk.request.status = Status.DECODE

    def finish(self, request: Request) -> Move | None:
        """Take `request` out (waiting or running). If it held a row that is not the last, the
        last row moves into the hole; the returned `Move` must be applied to the pool."""
        status, request.status = request.status, Status.FINISHED
        if status is Status.WAITING:
            self.waiting.remove(request)
            return None
        if status is Status.FINISHED:
            return None
        hole, last = request.slot, self.rows.pop()
        request.slot = -1
        if last is request:
            return None
        self.rows[hole] = last
        move = Move(src=last.slot, dst=hole, length=last.num_computed)
        last.slot = hole
        return move

    def _prefilling(self) -> list[Request]:
        return sorted((r for r in self.rows if r.status is Status.PREFILL), key=_admission_order)

    def _pending_prefill(self) -> int:
        return sum(r.prompt_left for r in self.rows if r.status is Status.PREFILL)


def _admission_order(request: Request) -> tuple[float, float]:
    admitted = request.admitted_at if request.admitted_at is not None else request.arrival
    return admitted, request.arrival
