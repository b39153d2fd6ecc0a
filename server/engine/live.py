"""The engine thread's handle on one live request: its stream, detokenizer and generator."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from server.engine.detokenizer import Detokenizer
from server.engine.request import Finished, FinishReason, Request
from server.engine.stream import RequestStream
from server.errors import ServeError
from server.models.loader import LoadedModel


@dataclass(eq=False)
class Live:
    request: Request
    stream: RequestStream
    detokenizer: Detokenizer
    generator: torch.Generator | None  # None for greedy requests
    holds_prefix: bool = False  # pinned its prefix-cache entry; released when it finishes
    unsent: list[int] = field(default_factory=list)  # token ids not yet in a TextDelta

    def finished(self, reason: FinishReason, end: float, error: ServeError | None) -> Finished:
        request = self.request
        return Finished(
            finish_reason=reason,
            usage=request.usage(),
            timings=request.timings(end),
            error_type=error.type if error is not None else None,
            error_message=error.message if error is not None else None,
        )


def serve_error(exc: BaseException) -> ServeError:
    """A per-request failure as the error tree's type + message."""
    if isinstance(exc, ServeError):
        return exc
    return ServeError(f"{type(exc).__name__}: {exc}")


def eos_ids(loaded: LoadedModel) -> frozenset[int]:
    """End-of-sequence ids from the tokenizer and the model's (generation) config."""
    found: set[int] = set()
    candidates = (
        loaded.tokenizer.eos_token_id,
        getattr(loaded.model.config, "eos_token_id", None),
        getattr(getattr(loaded.model, "generation_config", None), "eos_token_id", None),
    )
    for value in candidates:
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, (list, tuple)):
            found.update(v for v in value if isinstance(v, int))
    return frozenset(found)
