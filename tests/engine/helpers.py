"""Test helpers: prefixes, the independent reference (the model's own forward, no engine), a
started engine, and a step-by-step trace of what an engine computed."""

from __future__ import annotations

import hashlib
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import torch

from server.engine import Engine, EngineConfig, PrefixSource
from server.engine.engine import StepHook
from server.engine.request import Request
from server.engine.runner import Runner
from server.engine.scheduler import Work
from server.models.loader import LoadedModel
from server.models.prefix_kv import forward_with_prefix, prefix_kv


def make_prefix(loaded: LoadedModel, length: int, form: str = "p_theta", seed: int = 0,
                name: str = "p") -> PrefixSource:
    """A random prefix of `length` tokens in `form`, hashed like the registry hashes it."""
    fp = loaded.fingerprint
    g = torch.Generator().manual_seed(seed)
    if form == "p_theta":
        tensors = {"p_theta": torch.randn(fp.num_layers, length, fp.hidden_size, generator=g)}
    else:
        shape = (fp.num_layers, fp.num_kv_heads, length, fp.head_dim)
        keys, values = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        tensors = {"keys": keys, "values": values}
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(tensors[key].numpy().tobytes())
    return PrefixSource(digest.hexdigest(), name, 1, form, length, tensors, fp)


@torch.no_grad()
def reference_greedy(
    loaded: LoadedModel, prompt: list[int], prefix: PrefixSource | None, max_new: int
) -> tuple[list[int], torch.Tensor]:
    """Greedy decoding by repeated full forwards with the prefix as past K/V (DynamicCache).

    Returns the tokens and the first step's logits [vocab]."""
    keys = values = None
    if prefix is not None:
        keys, values = prefix_kv(loaded, prefix.form, prefix.tensors)
    ids, first = list(prompt), None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: thread hand-offs cost more than they save
    try:
        for _ in range(max_new):
            logits = forward_with_prefix(loaded, torch.tensor([ids]), None, keys, values)[0, -1]
            first = logits.float() if first is None else first
            ids.append(int(logits.argmax()))
    finally:
        torch.set_num_threads(threads)
    assert first is not None
    return ids[len(prompt):], first


class RecordingRunner(Runner):
    """The real runner, recording what it ran: each forward's rows, and each request's first
    sampled logits (its first token's distribution) on the host."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.forwards: list[list[Work]] = []
        self.first_logits: dict[str, torch.Tensor] = {}  # request id -> [vocab]

    def run(self, work: Sequence[Work]) -> torch.Tensor:
        logits = super().run(work)
        self.forwards.append(list(work))
        for item, row in zip([w for w in work if w.samples], logits, strict=True):
            self.first_logits.setdefault(item.request_id, row.detach().cpu().clone())
        return logits


def recorder(engine: Engine) -> RecordingRunner:
    """The engine's runner, built with `runner=RecordingRunner`."""
    assert isinstance(engine.runner, RecordingRunner)
    return engine.runner


class OnForward(StepHook):
    """A step hook that calls `action(work)` before each forward (slow steps, a stalled or
    failing device); what it raises is that forward's failure."""

    def __init__(self, action: Callable[[Sequence[Work]], object]) -> None:
        self.action = action

    def forward(self, work: Sequence[Work]) -> None:
        self.action(work)


@asynccontextmanager
async def running(loaded: LoadedModel, *, runner: type[Runner] = Runner,
                  step_hook: StepHook | None = None, **config: object) -> AsyncIterator[Engine]:
    """A started engine that is always shut down (and its thread joined) afterwards."""
    engine = Engine(loaded, EngineConfig(**config), runner=runner,  # type: ignore[arg-type]
                    step_hook=step_hook)
    engine.start()
    try:
        yield engine
    finally:
        engine.shutdown_now()


@dataclass
class StepTrace(StepHook):
    """What a running engine did, step by step, recorded on its own thread: each step's work
    (what the runner was asked to compute) and the step from which each request could run.

    It is the engine's step hook (the runner and scheduler still do all the work), so tests can
    count tokens and steps instead of timing anything. `hold_at` stops the engine thread once,
    inside that step (1-based) or the first one after it is set, until `release` is set, so a
    test can place an arrival at a known step.
    """

    steps: list[list[Work]] = field(default_factory=list)  # step -> the work it computed
    arrivals: dict[str, int] = field(default_factory=dict)  # request id -> first step it may run
    tenants: dict[str, str] = field(default_factory=dict)  # request id -> tenant name
    prompts: dict[str, int] = field(default_factory=dict)  # request id -> prompt tokens
    hold_at: int | None = None
    reached: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def attach(cls, engine: Engine, hold_at: int | None = None) -> StepTrace:
        """Make a trace the (not yet started) engine's step hook."""
        trace = cls(hold_at=hold_at)
        engine.step_hook = trace
        return trace

    def forward(self, work: Sequence[Work]) -> None:
        self.steps.append(list(work))
        hold = self.hold_at
        if hold is not None and len(self.steps) >= hold and not self.reached.is_set():
            self.reached.set()
            self.release.wait(timeout=120)

    def arrived(self, request: Request) -> None:
        self.arrivals[request.request_id] = len(self.steps)
        self.tenants[request.request_id] = request.tenant.name
        self.prompts[request.request_id] = len(request.prompt_ids)

    def admitted(self) -> dict[str, int]:
        """Request id -> the step it first computed in."""
        first: dict[str, int] = {}
        for step, work in enumerate(self.steps):
            for item in work:
                first.setdefault(item.request_id, step)
        return first

    def token_steps(self, request_id: str) -> list[int]:
        """The steps that sampled a token for `request_id`."""
        return [step for step, work in enumerate(self.steps) for item in work
                if item.request_id == request_id and item.samples]

    def backlogged(self, tenant: str) -> list[bool]:
        """Per step: `tenant` had a request waiting when the step was scheduled."""
        admitted, never = self.admitted(), len(self.steps)
        waits = [(self.arrivals[rid], admitted.get(rid, never))
                 for rid, name in self.tenants.items() if name == tenant]
        return [any(a <= step <= b for a, b in waits) for step in range(len(self.steps))]

    def service(self, step: int, prompt_weight: float, output_weight: float) -> Counter[str]:
        """Tenant -> weighted tokens the step computed for it: prompt tokens plus tokens made."""
        served: Counter[str] = Counter()
        for item in self.steps[step]:
            prompt = self.prompts[item.request_id]
            prompt_tokens = max(0, min(item.start + item.length, prompt) - item.start)
            served[self.tenants[item.request_id]] += (prompt_weight * prompt_tokens
                                                 + output_weight * item.samples)
        return served
