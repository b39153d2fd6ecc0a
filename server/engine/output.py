"""From sampled token ids to text events on each caller's loop, on a thread of its own.

The engine thread hands over each step's results as one batch and goes on with the next step;
this thread detokenizes, watches for stop strings and delivers `TextDelta`/`Finished` events (one
`call_soon_threadsafe` per caller loop per batch). So detokenization and delivery never delay the
model, as long as a core is free for this thread. When torch's threads already take every CPU
(the CPU default), a third busy thread only preempts the model's workers, so `use_thread` keeps
this work on the engine thread, between steps. A stop string is found here, after the engine may
already have computed a token or two more: those are dropped, the request is finished here, and
the engine is asked to let it go.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from server.engine.detokenizer import Detokenizer
from server.engine.request import Finished, FinishReason, Request, TextDelta, Usage, now
from server.engine.stream import Outbox, RequestStream
from server.errors import ServeError

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Live:
    """The engine's handle on one request's stream. `request` and `generator` belong to the
    engine thread (the output thread reads only the request's ids and counters once a step has
    handed them over); `detokenizer` onwards belong to the output thread."""

    request: Request
    stream: RequestStream
    generator: torch.Generator | None  # the request's own random stream (seeded requests)
    detokenizer: Detokenizer
    emitted: int = 0  # output tokens delivered so far
    unsent: list[int] = field(default_factory=list)  # token ids not yet in a TextDelta
    done: bool = False  # its Finished event was delivered


@dataclass(frozen=True)
class Tokens:
    live: Live
    token_ids: tuple[int, ...]
    finish: FinishReason | None = None  # set when the last token ends the request
    silent_last: bool = False  # the last token is a stop/EOS id: counted, never shown as text


@dataclass(frozen=True)
class Finish:
    live: Live
    reason: FinishReason
    error: ServeError | None = None


Item = Tokens | Finish


def use_thread(setting: str, device: torch.device) -> bool:
    """`--output-thread`: "on", "off", or "auto" = a thread of its own unless the model runs on
    the CPU with as many torch threads as the process may use CPUs."""
    if setting != "auto":
        return setting == "on"
    if device.type != "cpu":
        return True
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return torch.get_num_threads() < (cpus or 1)


class OutputProcessor:
    def __init__(self, release: Callable[[str], None], *, threaded: bool = True) -> None:
        self._release = release  # tell the engine a request ended here (stop string)
        self.threaded = threaded  # False: `put` does the work on the caller's (engine) thread
        self._queue: queue.SimpleQueue[list[Item] | None] = queue.SimpleQueue()
        self._outbox = Outbox()
        self._thread = threading.Thread(target=self._loop, name="prefix-serve-output",
                                        daemon=True)

    def start(self) -> None:
        if self.threaded:
            self._thread.start()

    def put(self, items: list[Item]) -> None:
        if not items:
            return
        if self.threaded:
            self._queue.put(items)
        else:
            self._process(items)

    def stop(self) -> None:
        """Deliver everything already handed over, then end the thread."""
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join()
        else:
            self._drain()

    def _loop(self) -> None:
        while (batch := self._queue.get()) is not None:
            self._process(batch)

    def _drain(self) -> None:
        while True:
            try:
                batch = self._queue.get_nowait()
            except queue.Empty:
                return
            if batch is not None:
                self._process(batch)

    def _process(self, batch: list[Item]) -> None:
        for item in batch:
            if item.live.done:
                continue  # ended here already (stop string): later tokens are dropped
            try:
                if isinstance(item, Tokens):
                    self._tokens(item)
                else:
                    self._finish(item.live, item.reason, item.error)
            except Exception as exc:  # noqa: BLE001 - one request's text failed, not the others
                log.exception("output of request %s failed", item.live.request.request_id)
                self._finish(item.live, FinishReason.ERROR, ServeError(f"output failed: {exc!r}"))
                self._release(item.live.request.request_id)
        self._outbox.flush()

    def _tokens(self, item: Tokens) -> None:
        live = item.live
        last = len(item.token_ids) - 1
        for i, token in enumerate(item.token_ids):
            live.emitted += 1
            live.unsent.append(token)
            if i == last and item.silent_last:
                break
            text = live.detokenizer.push(token)
            if text:
                self._emit(live, text)
            if live.detokenizer.stopped:
                self._finish(live, FinishReason.STOP)
                self._release(live.request.request_id)
                return
        if item.finish is not None:
            self._finish(live, item.finish)

    def _emit(self, live: Live, text: str) -> None:
        self._outbox.put(live.stream, TextDelta(text, tuple(live.unsent)))
        live.unsent = []

    def _finish(self, live: Live, reason: FinishReason, error: ServeError | None = None) -> None:
        completed = reason in (FinishReason.STOP, FinishReason.LENGTH)
        rest = live.detokenizer.flush() if completed else ""
        if completed and (rest or live.unsent):
            self._emit(live, rest)
        request = live.request
        usage = Usage(len(request.prompt_ids), live.emitted, request.prefix_len)
        self._outbox.put(live.stream, Finished(
            finish_reason=reason, usage=usage, timings=request.timings(now()),
            error=type(error) if error is not None else None,
            error_message=error.message if error is not None else None,
        ))
        live.done = True
