"""Shared route dependencies as `Annotated` aliases: services, principal, tenant, engine, store."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request, Security
from fastapi.security import HTTPBearer

from prefix_registry.errors import TenantNotFoundError, excerpt
from prefix_registry.store import PrefixStore
from server.api.auth import Principal
from server.api.engine_backend import EngineBackend
from server.api.guard import principal_of
from server.api.middleware import annotate
from server.api.state import Services
from server.errors import FatalEngineError, ShuttingDownError

# Declared for the OpenAPI document; the header itself is parsed by `Authenticator`.
_bearer = HTTPBearer(auto_error=False, description="the operator key or a tenant API key")


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


async def current_principal(
    request: Request, services: ServicesDep, _: Annotated[object, Security(_bearer)] = None
) -> Principal:
    principal = principal_of(request.scope)  # RequestGuard's, before the body was read
    if principal is None:
        principal = await services.auth.authenticate(request.headers.get("authorization"))
    annotate(request, tenant=principal.tenant or "(operator)")
    return principal


PrincipalDep = Annotated[Principal, Depends(current_principal)]


def operator_principal(principal: PrincipalDep) -> Principal:
    principal.require_operator()
    return principal


OperatorDep = Annotated[Principal, Depends(operator_principal)]


def acting_tenant(request: Request, principal: Principal, requested: str | None) -> str:
    """The tenant a call acts for (`Principal.tenant_for`). When the operator names none, the
    request is marked so that a 404 says how to name one (`errors.OPERATOR_TENANT_HINT`)."""
    tenant = principal.tenant_for(requested)
    if principal.is_operator and requested is None and principal.tenant is None:
        request.state.operator_default_tenant = True
    return tenant


async def generation_tenant(
    request: Request,
    principal: PrincipalDep,
    services: ServicesDep,
    x_tenant: Annotated[
        str | None, Header(description="operator key only: the tenant to act for")
    ] = None,
) -> str:
    """The tenant whose prefixes a generation call may use. A tenant the operator names must
    exist (it also labels the request in logs and metrics)."""
    tenant = acting_tenant(request, principal, x_tenant)
    if x_tenant is not None and principal.is_operator and not await services.store.tenant_exists(
        tenant
    ):
        raise TenantNotFoundError(f"tenant {excerpt(tenant)} does not exist")
    annotate(request, tenant=tenant)
    return tenant


GenerationTenant = Annotated[str, Depends(generation_tenant)]


def running_engine(services: ServicesDep) -> EngineBackend:
    """The engine, if it takes new requests: 503 while shutting down or after it died."""
    if services.lifecycle.draining:
        raise ShuttingDownError("the server is shutting down")
    if not services.backend.alive:
        raise FatalEngineError(f"the engine is not running: {services.backend.fatal_error}")
    return services.backend


EngineDep = Annotated[EngineBackend, Depends(running_engine)]


def get_store(services: ServicesDep) -> PrefixStore:
    return services.store


StoreDep = Annotated[PrefixStore, Depends(get_store)]

