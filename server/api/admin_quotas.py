"""A tenant's quota: read (operator, or the tenant itself) and set (operator) field by field."""

from __future__ import annotations

from fastapi import APIRouter

from prefix_registry.quotas import TenantQuota
from server.api.deps import OperatorDep, PrincipalDep, ServicesDep
from server.api.errors import error_responses
from server.api.quota_schemas import QuotaUpdate, QuotaValues, TenantQuotaOut, UsageOut
from server.api.state import Services

router = APIRouter(prefix="/admin/tenants", tags=["tenants"])
_ERRORS = error_responses(401, 403, 404, 422, 503)


@router.get("/{name}/quota", response_model=TenantQuotaOut, responses=_ERRORS,
            summary="A tenant's quota in force, what was set for it, and its storage use")
async def get_quota(name: str, principal: PrincipalDep, services: ServicesDep) -> TenantQuotaOut:
    tenant = principal.tenant_for(name)
    overrides = await services.store.get_quota(tenant)
    return await _quota_out(services, tenant, overrides)


@router.patch("/{name}/quota", response_model=TenantQuotaOut, responses=_ERRORS,
              summary="Set (a value) or clear (null) fields of a tenant's quota")
async def update_quota(
    name: str, body: QuotaUpdate, _: OperatorDep, services: ServicesDep
) -> TenantQuotaOut:
    overrides = await services.store.update_quota(name, body.changes())
    return await _quota_out(services, name, overrides)


async def _quota_out(services: Services, tenant: str, overrides: TenantQuota) -> TenantQuotaOut:
    quota = services.quotas.remember(tenant, overrides)
    usage = await services.store.usage(tenant)
    return TenantQuotaOut(
        name=tenant, quota=QuotaValues(**quota.to_dict()), overrides=overrides.to_dict(),
        usage=UsageOut(prefixes=usage.prefixes, stored_bytes=usage.stored_bytes),
    )
