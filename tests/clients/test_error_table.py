"""Every error type the server can send maps, in the SDK, to the server's status and class.

The server's types are enumerated, not listed: every `ServeError` class defined anywhere in the
server (all its modules are imported first, so a class added in any room is found), every registry
error class as the HTTP mapping sends it (the registry's classes are the only definition of not
found, conflict, quota exceeded and registry unavailable; each must map to a server error, or it
would reach the client as a 500), and the types its HTTP handler gives plain HTTP errors
(`_STATUS_TYPES`). For each, the SDK must build
the same status and class from the plain response *and* from an `error` event inside a 200
stream, where only the type is there to go by.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

import httpx
import pytest

import clients
import prefix_registry
import server
from clients._exceptions import make_status_error
from prefix_registry import errors as reg
from server import errors as srv
from server.api import errors as api_errors

REQUEST = httpx.Request("POST", "http://server/generate")


def _import_all(package: ModuleType) -> None:
    for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)


def _subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found


def server_error_types() -> dict[str, tuple[int, str | None]]:
    """type -> (HTTP status, the server's class name, or None for a plain HTTP error)."""
    _import_all(server)
    _import_all(prefix_registry)
    table: dict[str, tuple[int, str | None]] = {}
    for cls in [srv.ServeError, *_subclasses(srv.ServeError)]:
        seen = table.setdefault(cls.type, (cls.status_code, cls.__name__))
        assert seen[0] == cls.status_code, f"{cls.type} has two statuses on the server"
    for registry_cls in _subclasses(reg.RegistryError):
        sent = api_errors.to_serve_error(registry_cls("x"))
        if sent is not None:
            seen = table.setdefault(sent.type, (sent.status_code, registry_cls.__name__))
            assert seen[0] == sent.status_code, f"{sent.type} has two statuses on the server"
    for status, error_type in api_errors._STATUS_TYPES.items():
        seen = table.setdefault(error_type, (status, None))
        assert seen[0] == status, f"{error_type}: {status} and {seen[0]} on the server"
    return table


SERVER_TYPES = server_error_types()


def expected_class(status: int, server_class: str | None) -> type[clients.APIStatusError]:
    """The SDK class of the server's name if there is one (NotFoundError, QuotaExceededError...),
    else the class of the status."""
    same_name = getattr(clients, server_class or "", None)
    if isinstance(same_name, type) and issubclass(same_name, clients.APIStatusError):
        return same_name
    by_status = [
        cls for cls in vars(clients).values()
        if isinstance(cls, type) and issubclass(cls, clients.APIStatusError)
        and cls.status_code == status and cls.__bases__ == (clients.APIStatusError,)
    ]
    if by_status:
        return by_status[0]
    return clients.InternalServerError if status >= 500 else clients.APIStatusError


def test_the_enumeration_finds_the_server_s_types() -> None:
    assert {"not_found", "quota_exceeded", "engine_dead", "replica_unavailable",
            "method_not_allowed", "internal_error"} <= set(SERVER_TYPES)


@pytest.mark.parametrize("error_type", sorted(SERVER_TYPES))
def test_each_server_error_type_keeps_its_status_and_class(error_type: str) -> None:
    status, server_class = SERVER_TYPES[error_type]
    body = {"error": {"type": error_type, "message": "went wrong"}}
    expected = expected_class(status, server_class)
    plain = make_status_error(httpx.Response(status, json=body, request=REQUEST), body)
    streamed = make_status_error(httpx.Response(200, request=REQUEST), body)  # an SSE `error`
    for error in (plain, streamed):
        assert (type(error), error.status_code, error.type) == (expected, status, error_type)


def test_every_registry_error_reaches_the_client_as_a_server_error() -> None:
    _import_all(prefix_registry)
    unmapped = [
        cls.__name__ for cls in _subclasses(reg.RegistryError)
        if api_errors.to_serve_error(cls("x")) is None
    ]
    assert not unmapped, f"registry errors that would be a 500 internal_error: {unmapped}"
