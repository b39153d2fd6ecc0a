"""What an engine replica sends back before the engine's own events (all pickle small)."""

from __future__ import annotations

from dataclasses import dataclass

from prefix_registry.errors import RegistryError
from server.engine.config import EngineStats
from server.engine.request import EngineRequest
from server.errors import ServeError


@dataclass(frozen=True)
class Accepted:
    """The replica's engine took the request; its events follow."""

    replica: str  # the replica's id (what `X-Prefix-Serve-Replica` shows)


@dataclass(frozen=True)
class Refused:
    """The replica refused the request before running it: a ServeError or a registry error (a
    prefix not found...), by its class."""

    error: type[ServeError] | type[RegistryError]
    message: str
    retry_after: float | None = None  # for 429


@dataclass(frozen=True)
class ReplicaInfo:
    replica: str  # the replica's id
    pid: int  # its process
    host: str
    stats: EngineStats


def prefix_model_id(request: EngineRequest) -> str:
    """The multiplexed model id: the resolved prefix `tenant/name@version`; "" = base model.

    A version never changes once stored, so an id never names stale tensors."""
    prefix = request.prefix
    if prefix is None:
        return ""
    return f"{request.tenant.name}/{prefix.name}@{prefix.version}"


def split_model_id(model_id: str) -> tuple[str, str]:
    """`tenant/name@version` -> (tenant, "name@version")."""
    tenant, _, ref = model_id.partition("/")
    return tenant, ref
