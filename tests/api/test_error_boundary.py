"""Errors cross the engine boundary (and the Ray replica boundary) as the error classes
themselves, never as a `type` string mapped back: the caller raises exactly the class the
engine or replica failed with, even where two classes share a wire type."""

from __future__ import annotations

import pickle
from collections.abc import Iterator

import pytest

from server import errors as srv
from server.api.engine_calls import finished_error
from server.engine.request import Finished, FinishReason, Timings, Usage


def _classes(root: type[srv.ServeError]) -> Iterator[type[srv.ServeError]]:
    yield root
    for sub in root.__subclasses__():
        yield from _classes(sub)


ENGINE_ERRORS = sorted({c for c in _classes(srv.ServeError) if c.__module__ == "server.errors"},
                       key=lambda c: c.__name__)


def _failed(error: type[srv.ServeError]) -> Finished:
    return Finished(FinishReason.ERROR, Usage(1, 0, 0), Timings(0.0, None, 0.0), error=error,
                    error_message="it failed")


@pytest.mark.parametrize("cls", ENGINE_ERRORS, ids=lambda c: c.__name__)
def test_a_finished_error_is_raised_as_its_own_class(cls: type[srv.ServeError]) -> None:
    """Before, `ServeError` (type internal_error) came back as `RequestError`, which shares
    its type string: the table keyed by type kept the last class it saw."""
    try:
        raised = finished_error(_failed(cls))
    except TypeError:  # a class that needs more than a message is never a finish reason
        pytest.skip(f"{cls.__name__} needs more than a message")
    assert type(raised) is cls and raised.message == "it failed"
    event = _failed(cls)
    assert event.error_type == cls.type  # the wire type still reads the same
    assert pickle.loads(pickle.dumps(event)) == event  # as Ray carries it between processes


def test_a_ray_refusal_is_raised_as_its_own_class() -> None:
    pytest.importorskip("ray")
    from server.serve_ray.client import _refusal
    from server.serve_ray.messages import Refused

    for cls in (srv.ServeError, srv.InvalidRequestError, srv.ContextLengthError):
        assert type(_refusal(Refused(cls, "no"))) is cls
    busy = _refusal(Refused(srv.TenantQueueFullError, "full", retry_after=2.0))
    assert type(busy) is srv.TenantQueueFullError and busy.retry_after == 2.0
