"""The registry's error classes are the only definition of not found, conflict, quota exceeded
and registry unavailable: the server sends each with the status and type it always had, and a
Ray replica's refusal carries the registry's class itself."""

from __future__ import annotations

import pickle

import pytest

from prefix_registry import errors as reg
from server import errors as srv
from server.api.errors import error_response, to_serve_error

WIRE = [
    (reg.NotFoundError, 404, "not_found", None),
    (reg.PrefixNotFoundError, 404, "not_found", None),
    (reg.ConflictError, 409, "conflict", None),
    (reg.QuotaExceededError, 403, "quota_exceeded", None),
    (reg.RegistryUnavailableError, 503, "registry_unavailable", "1"),
]


@pytest.mark.parametrize(("cls", "status", "error_type", "retry_after"), WIRE,
                         ids=lambda v: getattr(v, "__name__", str(v)))
def test_a_registry_error_keeps_its_status_and_type(
    cls: type[reg.RegistryError], status: int, error_type: str, retry_after: str | None
) -> None:
    error = to_serve_error(cls("gone"))
    assert error is not None
    assert (error.status_code, error.type, error.message) == (status, error_type, "gone")
    response = error_response(error)
    assert response.status_code == status
    assert response.headers.get("Retry-After") == retry_after


def test_the_server_names_are_the_registry_classes() -> None:
    assert srv.NotFoundError is reg.NotFoundError
    assert srv.ConflictError is reg.ConflictError
    assert srv.QuotaExceededError is reg.QuotaExceededError
    assert srv.RegistryUnavailableError is reg.RegistryUnavailableError


def test_a_ray_refusal_carries_the_registry_class() -> None:
    pytest.importorskip("ray")
    from server.serve_ray.client import _refusal
    from server.serve_ray.messages import Refused

    refused = pickle.loads(pickle.dumps(Refused(reg.PrefixNotFoundError, "no such prefix")))
    raised = _refusal(refused)
    assert type(raised) is reg.PrefixNotFoundError and raised.message == "no such prefix"
