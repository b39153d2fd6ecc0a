"""The engine: a loop on its own thread; each step is schedule -> run -> update.

Callers on the asyncio loop `submit()` requests and get a `RequestStream`; `cancel()` and
`shutdown()` are safe from any thread. The scheduler, block manager, pool and model belong to the
engine thread; text and event delivery to the output thread (`output.py`). See docs/engine.md.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import threading
from collections.abc import Callable, Sequence
from typing import assert_never

import torch

from server.engine import checks
from server.engine.attention.backends import AttentionBackend
from server.engine.block_manager import BlockManager
from server.engine.config import EngineConfig, EngineStats, make_queue
from server.engine.detokenizer import Detokenizer
from server.engine.finishing import eos_ids, serve_error
from server.engine.intake import Cancel, Intake, Message, Release, Stop, Submit
from server.engine.kv_pool import KVPool
from server.engine.memory import plan_pool
from server.engine.output import Finish, Item, Live, OutputProcessor, Tokens, use_thread
from server.engine.prefixes import prefix_keys_values
from server.engine.request import EngineRequest, FinishReason, Request, now
from server.engine.runner import Runner
from server.engine.sampler import finite_rows, make_generator, sample
from server.engine.scheduler import NewPrefix, Scheduler, SchedulerLimits, StepPlan, Work
from server.engine.stream import RequestStream
from server.errors import (
    FatalEngineError,
    NonFiniteOutputError,
    ServeError,
)
from server.models.loader import LoadedModel

log = logging.getLogger(__name__)
_ids = itertools.count(1)
# Errors no single request causes: the engine cannot go on after them.
_FATAL: tuple[type[BaseException], ...] = (
    MemoryError, torch.OutOfMemoryError, FatalEngineError,
    *((torch.AcceleratorError,) if hasattr(torch, "AcceleratorError") else ()),
)


class StepHook:
    """Watches the engine thread (tracing, tests, fault injection); this base does nothing.

    `arrived` sees each request taken from the inbox (it waits from this step on); `forward` sees
    the rows of each forward just before it runs, and whatever it raises is that forward's
    failure (a request's own, or fatal for a device error), as a real one would be.
    """

    def arrived(self, request: Request) -> None:
        pass

    def forward(self, work: Sequence[Work]) -> None:
        pass


RunnerFactory = Callable[[LoadedModel, KVPool, AttentionBackend], Runner]


class Engine:
    def __init__(
        self, loaded: LoadedModel, config: EngineConfig | None = None, *,
        runner: RunnerFactory = Runner, step_hook: StepHook | None = None,
    ) -> None:
        """`runner` builds the runner from the model, the pool and the attention backend (a
        subclass may record what it ran); `step_hook` watches the engine thread (StepHook)."""
        self.loaded, self.config = loaded, config or EngineConfig()
        self.pool_plan = plan_pool(loaded, self.config)
        self.pool = KVPool(self.pool_plan.shape, self.pool_plan.num_blocks, loaded.dtype,
                           loaded.device)
        self.blocks = BlockManager(self.pool.num_blocks, self.pool.shape.block_size)
        self.scheduler = Scheduler(self.blocks, make_queue(self.config), SchedulerLimits(
            max_running=self.config.max_batch_size,
            max_tokens=self.config.max_num_batched_tokens,
            watermark=self.pool_plan.watermark_blocks,
            lookahead=self.config.admission_lookahead_tokens,
        ))
        self.runner = runner(loaded, self.pool, self.pool_plan.backend)
        self.step_hook = step_hook or StepHook()  # read at each use: replacing it is safe
        self.intake = Intake(self.config.max_queue)
        self.output = OutputProcessor(
            release=lambda rid: self.intake.post(Release(rid)),
            threaded=use_thread(self.config.output_thread, loaded.device),
        )
        self.steps = self.tokens_generated = 0
        self.busy_s = self.forward_s = 0.0  # see EngineStats
        self._failed_steps = 0  # consecutive steps whose every request failed alone
        self._eos = eos_ids(loaded)
        self._generator = torch.Generator(device=loaded.device)  # unseeded sampling rows
        self._generator.manual_seed(random.SystemRandom().getrandbits(63))
        self._live: dict[str, Live] = {}  # engine thread only
        self._out: list[Item] = []  # this iteration's results for the output thread
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="prefix-serve-engine", daemon=True)
        log.info("KV pool: %s", self.pool_plan.describe())

    # -- caller side (any thread; submit on the asyncio loop) ----------------------------------

    def start(self) -> None:
        self.output.start()
        self._thread.start()

    def submit(self, spec: EngineRequest) -> RequestStream:
        """Queue a request; its events arrive on the returned stream (bound to this loop)."""
        loop = asyncio.get_running_loop()
        self.intake.check_open()
        checks.check_sampling(spec.sampling)
        checks.check_prefix(spec)
        ids = checks.prompt_ids(spec, self.loaded.tokenizer, self.loaded.fingerprint.vocab_size)
        checks.check_fits(spec, len(ids), self.pool_plan)
        checks.check_tenant(spec.tenant)
        request = Request(spec.request_id or f"req-{next(_ids)}", spec, ids)
        stream = RequestStream(request.request_id, loop, self.cancel)
        self.intake.submit(Submit(request, stream))
        return stream

    def cancel(self, request_id: str) -> None:
        """The request leaves at the next step and frees its blocks (no-op when finished)."""
        self.intake.post(Cancel(request_id))

    def stats(self) -> EngineStats:
        blocks = self.blocks.stats()
        per_block = self.pool_plan.bytes_per_block
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=self.intake.queued + self.scheduler.requeued,
            tokens_generated=self.tokens_generated, prefix_cache_hits=blocks.prefix_hits,
            prefix_cache_misses=blocks.prefix_misses,
            prefix_cache_evictions=blocks.prefix_evictions,
            prefix_cache_bytes=blocks.prefix * per_block,
            prefix_cache_entries=blocks.prefix_entries,
            steps=self.steps, busy_s=self.busy_s, forward_s=self.forward_s,
            kv_blocks_total=blocks.total, kv_blocks_used=blocks.used,
            kv_blocks_prefix=blocks.prefix, kv_block_size=self.blocks.block_size,
            kv_cache_bytes=self.pool.nbytes, preemptions=self.scheduler.preemptions,
            tenant_service=self.scheduler.queue.counters(),
            tenant_preemptions=dict(self.scheduler.tenant_preemptions),
        )

    async def shutdown(self, grace_s: float) -> None:
        """Stop admitting, let running requests finish within `grace_s`, cancel the rest."""
        self.intake.close()
        deadline = asyncio.get_running_loop().time() + grace_s
        while self._busy() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(self.shutdown_now)

    def shutdown_now(self) -> None:
        """Cancel everything and stop the threads (blocking)."""
        self.intake.close()
        self.intake.post(Stop())
        if self._thread.is_alive():
            self._thread.join()
        elif not self._stopped:
            self._stop_all()  # never started or already dead: finish whoever is left here

    @property
    def alive(self) -> bool:
        return self.intake.alive

    @property
    def fatal_error(self) -> BaseException | None:
        return self.intake.fatal_error

    def _busy(self) -> bool:
        return bool(self._live) or self.intake.pending

    # -- engine thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while not self._stopped:
                if not self.scheduler.has_work and not self.intake.pending:
                    self.intake.wake.wait(timeout=0.5)
                    self.intake.wake.clear()
                self.step()
        except BaseException as exc:  # noqa: BLE001 - anything escaping a step kills the engine
            self._die(exc)

    def step(self) -> None:
        """One iteration: take new work, schedule, run the model once, hand out tokens."""
        self._drain_inbox()
        plan = self.scheduler.schedule(now())
        if not plan.empty:
            started = now()
            work, tokens = self._run(plan)
            self.scheduler.commit(plan)
            self._update(work, tokens)
            self.steps += 1
            self.busy_s += now() - started
        self._flush()

    def _run(self, plan: StepPlan) -> tuple[list[Work], list[int]]:
        """Write new prefixes, then one forward and sampling for the step's work. A failure a
        request caused fails that request alone. Returns the sampling work and its tokens."""
        self.intake.admitted([self._live[rid].request for rid in plan.admitted])
        self.pool.prepare(self.blocks.high_water)  # blocks handed out for the first time
        work = self._write_prefixes(plan)
        try:
            return self._forward(work)
        except _FATAL:
            raise
        except Exception:  # noqa: BLE001 - find the request(s) at fault, run the others alone
            log.warning("a step failed; running its %d requests one by one", len(work))
            return self._isolate(work)

    def _forward(self, work: Sequence[Work]) -> tuple[list[Work], list[int]]:
        started = now()
        self.step_hook.forward(work)
        logits = self.runner.run(work)  # [samplers, vocab]
        samplers = [w for w in work if w.samples]
        lives = [self._live[w.request_id] for w in samplers]
        tokens = sample(logits, [live.request.sampling for live in lives],
                        [live.generator for live in lives], self._generator)
        host = torch.stack([tokens, finite_rows(logits).long()]).tolist()  # the one host sync
        self.forward_s += now() - started
        return self._drop_non_finite(samplers, host[0], host[1])

    def _drop_non_finite(
        self, samplers: list[Work], tokens: list[int], finite: list[int]
    ) -> tuple[list[Work], list[int]]:
        """Fail the requests whose logits are not finite (theirs alone); the others go on."""
        if all(finite):
            return samplers, tokens
        kept = [(w, t) for w, t, ok in zip(samplers, tokens, finite, strict=True) if ok]
        for item, ok in zip(samplers, finite, strict=True):
            if not ok:
                self._fail_non_finite(self._live[item.request_id])
        return [w for w, _ in kept], [t for _, t in kept]

    def _fail_non_finite(self, live: Live) -> None:
        """NaN/inf logits mean NaN/inf somewhere in the K/V this request read or wrote: zero
        its own blocks before they return to the pool, then fail it (docs/security.md)."""
        request, prefix = live.request, live.request.spec.prefix
        blocks = self.blocks.table(request.request_id)
        log.warning("request %s (tenant %r, prefix %r v%s %s) gave non-finite logits: failed, "
                    "its %d KV blocks zeroed", request.request_id, request.tenant.name,
                    prefix and prefix.name, prefix and prefix.version,
                    prefix and prefix.content_hash[:12], len(blocks))
        self.pool.scrub(list(blocks))
        why = f": prefix {prefix.name!r} overflows the served model" if prefix is not None else ""
        self._finish(live, FinishReason.ERROR, NonFiniteOutputError(
            f"the model's output for this request is not finite (NaN/inf){why}"))

    def _isolate(self, work: Sequence[Work]) -> tuple[list[Work], list[int]]:
        """Run each request of a failed step alone; those that fail alone fail. When all of them
        do, the fault is not theirs (several in one step, or steps in a row): the engine dies."""
        samplers: list[Work] = []
        tokens: list[int] = []
        failed: list[tuple[Work, Exception]] = []
        for item in work:
            try:
                done, ids = self._forward([item])
            except _FATAL:
                raise
            except Exception as exc:  # noqa: BLE001 - this request's own failure, so far
                failed.append((item, exc))
                continue
            samplers.extend(done)
            tokens.extend(ids)
        self._failed_steps = self._failed_steps + 1 if len(failed) == len(work) else 0
        if failed and len(failed) == len(work) and (len(work) > 1 or self._failed_steps >= 3):
            cause = failed[0][1]
            raise FatalEngineError(f"every request of the step failed alone: {cause!r}") from cause
        for item, error in failed:
            log.warning("request %s failed: %r", item.request_id, error)
            self._finish(self._live[item.request_id], FinishReason.ERROR,
                         serve_error(error))
        return samplers, tokens

    def _write_prefixes(self, plan: StepPlan) -> list[Work]:
        """Compute and write the K/V of prefixes new to the pool; a prefix that fails fails its
        requests. Returns the plan's work without theirs."""
        failed: set[str] = set()
        for entry in plan.new_prefixes:
            try:
                source = self._live[entry.holders[0]].request.spec.prefix
                assert source is not None
                keys, values = prefix_keys_values(self.loaded, source)
                self.pool.write_prefix(list(entry.blocks), keys, values)
                self.blocks.written(entry.key)
            except _FATAL:
                raise
            except Exception as exc:  # noqa: BLE001 - a bad prefix fails its own requests only
                self._fail_prefix(entry, serve_error(exc))
                failed.update(entry.holders)
        return [w for w in plan.work if w.request_id not in failed]

    def _fail_prefix(self, entry: NewPrefix, error: ServeError) -> None:
        for request_id in entry.holders:
            self._finish(self._live[request_id], FinishReason.ERROR, error)
        self.blocks.drop_prefix(entry.key)

    def _update(self, samplers: list[Work], tokens: list[int]) -> None:
        for item, token in zip(samplers, tokens, strict=True):
            live = self._live.get(item.request_id)
            if live is not None:
                self._accept(live, token)

    def _accept(self, live: Live, token: int) -> None:
        """Append one sampled token; finish on a stop id, EOS or the length limit."""
        request = live.request
        request.output_ids.append(token)
        request.first_token_at = request.first_token_at or now()
        self.tokens_generated += 1
        self.scheduler.generated(request)
        sampling = request.sampling
        if token in sampling.stop_token_ids or (token in self._eos and not sampling.ignore_eos):
            self._out.append(Tokens(live, (token,), FinishReason.STOP, silent_last=True))
            return self._leave(live)
        if len(request.output_ids) >= sampling.max_new_tokens:
            self._out.append(Tokens(live, (token,), FinishReason.LENGTH))
            return self._leave(live)
        self._out.append(Tokens(live, (token,)))

    def _drain_inbox(self) -> None:
        for message in self.intake.take():
            self._handle(message)

    def _handle(self, message: Message) -> None:
        match message:
            case Submit():
                self._enqueue(message)
            case Cancel(request_id=request_id):
                if (live := self._live.get(request_id)) is not None:
                    self._finish(live, FinishReason.CANCELLED)
            case Release(request_id=request_id):  # a stop string: free what it holds
                if (live := self._live.get(request_id)) is not None:
                    self._leave(live)
            case Stop():
                self._stopped = True
                self._stop_all()
            case _:
                assert_never(message)

    def _enqueue(self, message: Submit) -> None:
        request, spec = message.request, message.request.spec
        self._live[request.request_id] = Live(
            request, message.stream, make_generator(spec.sampling, self.loaded.device),
            Detokenizer(self.loaded.tokenizer, request.prompt_ids, spec.sampling.stop),
        )
        self.scheduler.add(request)
        self.step_hook.arrived(request)

    def _enqueue_submitted(self) -> None:
        """Take in the requests still in the inbox, so they are finished with the others."""
        for message in self.intake.take():
            if isinstance(message, Submit):
                self._enqueue(message)

    def _stop_all(self) -> None:
        self._enqueue_submitted()
        for live in list(self._live.values()):
            self._finish(live, FinishReason.CANCELLED)
        self._flush()
        self._stopped = True
        self.output.stop()

    def _finish(self, live: Live, reason: FinishReason, error: ServeError | None = None) -> None:
        self._leave(live)
        self._out.append(Finish(live, reason, error))

    def _leave(self, live: Live) -> None:
        """Take the request out of the engine: its blocks return to the pool at once."""
        request = live.request
        self.intake.left(request)
        self.scheduler.finish(request)
        del self._live[request.request_id]

    def _flush(self) -> None:
        items, self._out = self._out, []
        self.output.put(items)

    def _die(self, exc: BaseException) -> None:
        """A fatal error: every caller gets Finished(error, engine_dead) now; submit refuses."""
        log.exception("engine loop died", exc_info=exc)
        self.intake.kill(exc)
        dead = FatalEngineError(f"the engine died: {exc!r}")
        self._enqueue_submitted()
        self._out = [Finish(live, FinishReason.ERROR, dead) for live in self._live.values()]
        self._live.clear()
        self._flush()
        self._stopped = True
        self.output.stop()
