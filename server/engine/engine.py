"""The engine: a loop on its own thread; each step is schedule -> run -> update.

Callers on the asyncio loop `submit()` requests and get a `RequestStream`; `cancel()` and
`shutdown()` are safe from any thread. Everything else (scheduler, pool, caches, model) belongs
to the engine thread. See docs/engine.md.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections.abc import Callable
from typing import cast

import torch

from server.engine import checks
from server.engine.config import EngineConfig, EngineStats, pool_for
from server.engine.detokenizer import Detokenizer
from server.engine.live import Live, eos_ids, serve_error
from server.engine.prefix_cache import PrefixCache
from server.engine.request import (
    EngineRequest,
    FinishReason,
    Request,
    Status,
    TextDelta,
    now,
)
from server.engine.runner import Runner
from server.engine.sampler import make_generator, sample
from server.engine.scheduler import Scheduler, StepPlan
from server.engine.stream import Outbox, RequestStream
from server.errors import (
    FatalEngineError,
    InvalidRequestError,
    OverloadedError,
    ServeError,
    ShuttingDownError,
)
from server.models.loader import LoadedModel

log = logging.getLogger(__name__)
_ids = itertools.count(1)


class Engine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None) -> None:
        self.loaded, self.config = loaded, config or EngineConfig()
        self.pool = pool_for(loaded, self.config)
        self.scheduler = Scheduler(self.pool.num_slots, self.config.prefill_chunk_tokens)
        self.runner = Runner(loaded.model, self.pool, loaded.device)
        self.prefix_cache = PrefixCache(self.config.prefix_cache_bytes)
        self.alive = True
        self.fatal_error: BaseException | None = None
        self.first_logits: dict[str, torch.Tensor] = {}  # request id -> [vocab] (record_logits)
        self.steps = self.tokens_generated = 0
        self.busy_s = self.forward_s = 0.0  # see EngineStats
        self._eos = eos_ids(loaded)
        self._live: dict[str, Live] = {}  # engine thread only
        self._outbox = Outbox()
        self._lock = threading.Lock()  # guards the fields below (shared with callers)
        self._inbox: list[tuple[str, object]] = []
        self._ids: set[str] = set()  # ids of requests not yet finished
        self._waiting = 0  # submitted, not yet admitted into a slot
        self._closing = self._stopped = False
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="prefix-serve-engine", daemon=True)

    # -- caller side (any thread; submit on the asyncio loop) ----------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, spec: EngineRequest) -> RequestStream:
        """Queue a request; its events arrive on the returned stream (bound to this loop)."""
        loop = asyncio.get_running_loop()
        self._check_open()
        checks.check_sampling(spec.sampling)
        ids = checks.prompt_ids(spec, self.loaded.tokenizer, self.loaded.fingerprint.vocab_size)
        checks.check_context(spec, len(ids), self.pool.shape.slot_len)
        request = Request(spec.request_id or f"req-{next(_ids)}", spec, ids)
        stream = RequestStream(request.request_id, loop, self.cancel)
        with self._lock:
            self._check_open()
            if self._waiting >= self.config.max_queue:
                raise OverloadedError("the engine's queue is full; retry shortly", retry_after=1.0)
            if request.request_id in self._ids:
                raise InvalidRequestError(f"request id {request.request_id!r} is already in use")
            self._ids.add(request.request_id)
            self._waiting += 1
            self._inbox.append(("submit", (request, stream)))
        self._wake.set()
        return stream

    def cancel(self, request_id: str) -> None:
        """The request leaves the batch at the next step (no-op when already finished)."""
        self._post("cancel", request_id)

    def stats(self) -> EngineStats:
        cache = self.prefix_cache.stats()
        return EngineStats(
            running=len(self.scheduler.rows), waiting=self._waiting,
            free_slots=self.scheduler.free_slots, total_slots=self.pool.num_slots,
            tokens_generated=self.tokens_generated, prefix_cache_hits=cache.hits,
            prefix_cache_misses=cache.misses, prefix_cache_evictions=cache.evictions,
            prefix_cache_bytes=cache.bytes, prefix_cache_entries=cache.entries, steps=self.steps,
            busy_s=self.busy_s, forward_s=self.forward_s,
        )

    async def shutdown(self, grace_s: float) -> None:
        """Stop admitting, let running requests finish within `grace_s`, cancel the rest."""
        with self._lock:
            self._closing = True
        deadline = asyncio.get_running_loop().time() + grace_s
        while self._busy() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(self.shutdown_now)

    def shutdown_now(self) -> None:
        """Cancel everything and stop the thread (blocking)."""
        with self._lock:
            self._closing = True
        self._post("stop", None)
        if self._thread.is_alive():
            self._thread.join()
        else:
            self._stop_all()  # never started or already dead: finish whoever is left here

    def _check_open(self) -> None:
        if not self.alive:
            raise FatalEngineError(f"the engine is dead: {self.fatal_error!r}")
        if self._closing:
            raise ShuttingDownError("the server is shutting down")

    def _post(self, kind: str, item: object) -> None:
        with self._lock:
            self._inbox.append((kind, item))
        self._wake.set()

    def _busy(self) -> bool:
        return bool(self._live or self._inbox)

    # -- engine thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while not self._stopped:
                if not self.scheduler.has_work and not self._inbox:
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                self.step()
        except BaseException as exc:  # noqa: BLE001 - anything escaping a step kills the engine
            self._die(exc)

    def step(self) -> None:
        """One iteration: take new work, schedule, run the model once, hand out tokens."""
        self._drain_inbox()
        for request in self.scheduler.admit(now()):
            self._admit(request)
        plan = self.scheduler.schedule()
        if not plan.empty:
            started = now()
            rows, logits, failed = self._run(plan)
            self.forward_s += now() - started
            self.scheduler.commit(plan)
            self._update(rows, logits, failed)
            self.steps += 1
            self.busy_s += now() - started
        self._outbox.flush()

    def _run(
        self, plan: StepPlan
    ) -> tuple[list[Request], torch.Tensor | None, list[tuple[Request, BaseException]]]:
        """Decode every running row once, then this step's prefill chunks (one forward each).
        Returns the requests that get a token, their logits [rows, vocab], and failed chunks."""
        rows, parts = list(plan.decode), []
        failed: list[tuple[Request, BaseException]] = []
        if plan.decode:
            parts.append(self.runner.decode(plan))
        for chunk in plan.prefill:
            try:
                logits = self.runner.prefill(chunk)
            except Exception as exc:  # noqa: BLE001 - one request's prompt failed, not the batch
                failed.append((chunk.request, exc))
                continue
            if chunk.completes_prompt:
                rows.append(chunk.request)
                parts.append(logits[None])
                if self.config.record_logits:
                    self.first_logits[chunk.request.request_id] = logits.detach().cpu().clone()
        return rows, (torch.cat(parts) if parts else None), failed

    def _update(
        self,
        rows: list[Request],
        logits: torch.Tensor | None,
        failed: list[tuple[Request, BaseException]],
    ) -> None:
        if logits is not None:
            lives = [self._live[r.request_id] for r in rows]
            gens = [live.generator for live in lives]
            tokens = sample(logits, [r.sampling for r in rows], gens)
            for live, token in zip(lives, tokens, strict=True):
                self._accept(live, token)
        for request, exc in failed:
            self._finish(self._live[request.request_id], FinishReason.ERROR, serve_error(exc))

    def _accept(self, live: Live, token: int) -> None:
        """Append one sampled token: stream its text, finish on stop / length."""
        request = live.request
        request.output_ids.append(token)
        request.first_token_at = request.first_token_at or now()
        self.tokens_generated += 1
        live.unsent.append(token)
        if token in request.sampling.stop_token_ids or (
            token in self._eos and not request.sampling.ignore_eos
        ):
            return self._finish(live, FinishReason.STOP)
        text = live.detokenizer.push(token)
        if text:
            self._emit(live, text)
        if live.detokenizer.stopped:
            self._finish(live, FinishReason.STOP)
        elif len(request.output_ids) >= request.sampling.max_new_tokens:
            self._finish(live, FinishReason.LENGTH)

    def _emit(self, live: Live, text: str) -> None:
        self._outbox.put(live.stream, TextDelta(text, tuple(live.unsent)))
        live.unsent = []

    def _drain_inbox(self) -> None:
        with self._lock:
            items, self._inbox = self._inbox, []
        handlers: dict[str, Callable[[object], None]] = {
            "submit": self._enqueue, "cancel": self._cancel, "stop": self._stop,
        }
        for kind, item in items:
            handlers[kind](item)

    def _enqueue(self, item: object) -> None:
        request, stream = cast(tuple[Request, RequestStream], item)
        spec, tokenizer = request.spec, self.loaded.tokenizer
        self._live[request.request_id] = Live(
            request, stream, Detokenizer(tokenizer, request.prompt_ids, spec.sampling.stop),
            make_generator(spec.sampling, self.loaded.device),
        )
        self.scheduler.add(request)

    def _cancel(self, item: object) -> None:
        live = self._live.get(str(item))
        if live is not None:
            self._finish(live, FinishReason.CANCELLED)

    def _stop(self, item: object) -> None:
        self._stopped = True
        self._stop_all()

    def _stop_all(self) -> None:
        for kind, item in self._take_inbox():
            if kind == "submit":
                self._enqueue(item)
        for live in list(self._live.values()):
            self._finish(live, FinishReason.CANCELLED)
        self._outbox.flush()

    def _take_inbox(self) -> list[tuple[str, object]]:
        with self._lock:
            items, self._inbox = self._inbox, []
        return items

    def _admit(self, request: Request) -> None:
        """A slot was given: count it out of the queue and place the prefix K/V into it."""
        with self._lock:
            self._waiting -= 1
        live = self._live[request.request_id]
        if request.spec.prefix is None:
            return
        try:
            keys, values, live.holds_prefix = self.prefix_cache.lookup(
                self.loaded, request.spec.prefix
            )
        except Exception as exc:  # noqa: BLE001 - a bad prefix fails its own request only
            return self._finish(live, FinishReason.ERROR, serve_error(exc))
        self.pool.write_prefix(request.slot, keys, values)
        request.num_computed = request.prefix_len

    def _finish(
        self, live: Live, reason: FinishReason, error: ServeError | None = None
    ) -> None:
        request = live.request
        with self._lock:
            self._ids.discard(request.request_id)
            if request.status is Status.WAITING:
                self._waiting -= 1
        move = self.scheduler.finish(request)
        if move is not None:
            self.pool.move(move)
        if live.holds_prefix and request.spec.prefix is not None:
            self.prefix_cache.release(request.spec.prefix)
        del self._live[request.request_id]
        request.finish_reason = reason
        completed = reason in (FinishReason.STOP, FinishReason.LENGTH)
        rest = live.detokenizer.flush() if completed else ""
        if completed and (rest or live.unsent):
            self._emit(live, rest)
        self._outbox.put(live.stream, live.finished(reason, now(), error))

    def _die(self, exc: BaseException) -> None:
        """A fatal error: every caller gets Finished(error, engine_dead) now; submit refuses."""
        log.exception("engine loop died", exc_info=exc)
        with self._lock:
            self.alive, self.fatal_error = False, exc
        dead = FatalEngineError(f"the engine died: {exc!r}")
        for kind, item in self._take_inbox():
            if kind == "submit":
                self._enqueue(item)
        for live in list(self._live.values()):
            self._outbox.put(live.stream, live.finished(FinishReason.ERROR, now(), dead))
        self._live.clear()
        self._outbox.flush()
