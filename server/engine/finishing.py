"""How requests finish: at the model's end-of-sequence ids, or with a failure as an error of the
error tree. (`Live`, a running request's output state, is in output.py.)"""

from __future__ import annotations

from server.errors import ServeError
from server.models.loader import LoadedModel


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
