"""What goes into the engine and what comes out of it.

A caller builds an `EngineRequest` (prompt, optional prefix, sampling) and hands it to
`Engine.submit`, which returns a stream of `TextDelta` events ending with one `Finished` event.
Request state inside the engine is one `Status` enum plus counters on `Request`.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from prefix_registry.fingerprint import ModelFingerprint
    from server.errors import ServeError


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    seed: int | None = None  # makes a sampled output reproducible whatever else is in the batch
    stop: tuple[str, ...] = ()  # stop strings; never part of the output
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class PrefixSource:
    """A prefix as the engine receives it: its tensors plus what identifies them.

    `tensors` holds either {"p_theta": [num_layers, prefix_len, d_model]} (the seed's form) or
    {"keys", "values"}: each [num_layers, num_kv_heads, prefix_len, head_dim] (the direct form).
    The engine's prefix cache keys on `content_hash`, so a replaced prefix never serves stale K/V.
    """

    content_hash: str  # sha256 of the tensor bytes
    name: str  # for reports and errors
    version: int
    form: str  # "p_theta" | "kv"
    prefix_len: int
    tensors: dict[str, torch.Tensor]
    fingerprint: ModelFingerprint | None = None  # the model it was made for; None = unchecked


@dataclass(frozen=True)
class TenantShare:
    """Who a request belongs to and that tenant's share of the engine (its current quotas).

    The API layer fills it from the tenant's record at submit; the scheduler reads it for fair
    admission, and `submit` for the queue cap. The newest request's share is the tenant's share.
    """

    name: str = ""  # tenant name; "" = untracked (direct engine use)
    weight: float = 1.0  # fair-share weight: a tenant with weight 2 gets twice the service
    max_running: int | None = None  # this tenant's requests running at once; None = no cap
    max_queued: int | None = None  # this tenant's waiting requests; beyond it submit refuses


@dataclass(frozen=True)
class EngineRequest:
    prompt: str | list[int]  # text, or token ids already encoded
    sampling: SamplingParams = field(default_factory=SamplingParams)
    prefix: PrefixSource | None = None
    request_id: str = ""  # assigned by the engine when empty
    add_special_tokens: bool = True
    tenant: TenantShare = field(default_factory=TenantShare)


class FinishReason(enum.StrEnum):
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    prefix_tokens: int


@dataclass(frozen=True)
class Timings:
    queue_s: float  # arrival -> admitted into the running batch
    ttft_s: float | None  # arrival -> first token (None if none was produced)
    total_s: float  # arrival -> finished


@dataclass(frozen=True)
class TextDelta:
    text: str  # always valid text; the deltas concatenate to the full output
    token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Finished:
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    error: type[ServeError] | None = None  # set when finish_reason is ERROR: the class itself
    error_message: str | None = None

    @property
    def error_type(self) -> str | None:
        """The error's wire `type` (for logs and error bodies)."""
        return self.error.type if self.error is not None else None


Event = TextDelta | Finished


@dataclass(frozen=True)
class Completion:
    """A whole (non-streamed) result: the concatenated deltas plus the final event."""

    request_id: str
    text: str
    token_ids: list[int]
    finished: Finished


def now() -> float:
    return time.perf_counter()


class Status(enum.Enum):
    """Where a request is inside the engine."""

    WAITING = "waiting"  # queued (new, or preempted); holds no KV blocks
    RUNNING = "running"  # holds KV blocks; computes its tokens (prompt in chunks, then one a step)
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """One request's state inside the engine: one status plus counters (engine thread only).

    Its own tokens are `prompt_ids + output_ids`; own token `i` has position id `prefix_len + i`
    (the prefix's tokens come first, PEFT's convention) and sits in slot `i` of its block table,
    which the block manager holds under its id, as it holds the shared prefix blocks it reads
    (`BlockManager.table`, `prefix_of`). `num_computed` own tokens have
    their K/V in the cache; once it reaches `num_tokens`, the last token's logits give the next
    output token. A preempted request loses its blocks and recomputes its tokens on return.
    """

    request_id: str
    spec: EngineRequest
    prompt_ids: list[int]
    arrival: float = field(default_factory=now)
    status: Status = Status.WAITING
    num_computed: int = 0  # own tokens whose K/V are in the cache
    output_ids: list[int] = field(default_factory=list)
    admitted_at: float | None = None  # first admission (a preempted request keeps it)
    first_token_at: float | None = None
    finish_reason: FinishReason | None = None
    preemptions: int = 0

    @property
    def prefix_len(self) -> int:
        return self.spec.prefix.prefix_len if self.spec.prefix is not None else 0

    @property
    def sampling(self) -> SamplingParams:
        return self.spec.sampling

    @property
    def tenant(self) -> TenantShare:
        return self.spec.tenant

    @property
    def num_tokens(self) -> int:
        """Own tokens known so far: the prompt plus what was generated."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def tokens_left(self) -> int:
        """Own tokens whose K/V are still to compute before the next token can be sampled."""
        return self.num_tokens - self.num_computed

    def token_ids(self, start: int, end: int) -> list[int]:
        """Own tokens [start, end) (prompt, then outputs)."""
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        return self.prompt_ids[start:] + self.output_ids[max(start - n, 0) : end - n]

    def timings(self, end: float) -> Timings:
        queued = (self.admitted_at if self.admitted_at is not None else end) - self.arrival
        ttft = None if self.first_token_at is None else self.first_token_at - self.arrival
        return Timings(queue_s=queued, ttft_s=ttft, total_s=end - self.arrival)
