"""Tenants and their API keys (operator key only). A key is shown once and stored as its sha256."""

from __future__ import annotations

from fastapi import APIRouter

from prefix_registry.store import PrefixStore
from server.api.auth import issue_key
from server.api.deps import OperatorDep, ServicesDep, StoreDep
from server.api.errors import error_responses
from server.api.schemas import (
    IssuedKey,
    KeyInfo,
    RevokedOut,
    TenantCreate,
    TenantDeleted,
    TenantInfo,
    TenantList,
)

router = APIRouter(prefix="/admin/tenants", tags=["tenants"])
_ERRORS = error_responses(401, 403, 422, 503)


@router.post(
    "", status_code=201, response_model=IssuedKey, responses={**_ERRORS, **error_responses(409)},
    summary="Create a tenant and its first API key",
)
async def create_tenant(body: TenantCreate, _: OperatorDep, store: StoreDep) -> IssuedKey:
    await store.create_tenant(body.name)
    return await _issue(store, body.name)


@router.get("", response_model=TenantList, responses=_ERRORS, summary="List tenants and key ids")
async def list_tenants(_: OperatorDep, store: StoreDep) -> TenantList:
    items = []
    for tenant in await store.list_tenants():
        keys = [KeyInfo(key_id=k.key_id, created_at=k.created_at)
                for k in await store.list_keys(tenant.name)]
        items.append(TenantInfo(name=tenant.name, keys=keys))
    return TenantList(items=items)


@router.post(
    "/{name}/keys", status_code=201, response_model=IssuedKey,
    responses={**_ERRORS, **error_responses(404)}, summary="Issue another API key",
)
async def add_key(name: str, _: OperatorDep, store: StoreDep) -> IssuedKey:
    return await _issue(store, name)


@router.delete(
    "/{name}/keys/{key_id}", response_model=RevokedOut,
    responses={**_ERRORS, **error_responses(404)}, summary="Revoke an API key",
)
async def revoke_key(name: str, key_id: str, _: OperatorDep, store: StoreDep) -> RevokedOut:
    await store.revoke_key(name, key_id)
    return RevokedOut(revoked=key_id)


@router.delete(
    "/{name}", response_model=TenantDeleted, responses={**_ERRORS, **error_responses(404)},
    summary="Delete a tenant: its keys stop working at once, its prefixes are deleted",
)
async def delete_tenant(
    name: str, _: OperatorDep, store: StoreDep, services: ServicesDep
) -> TenantDeleted:
    deletion = await store.delete_tenant(name)
    # Its metrics series and cached quota go too (other servers drop its keys through the
    # registry's announcement, and its series when they restart).
    services.metrics.forget_tenant(name)
    services.quotas.invalidate(name)
    return TenantDeleted(name=name, keys=deletion.keys, prefixes=deletion.prefixes)


async def _issue(store: PrefixStore, tenant: str) -> IssuedKey:
    key = issue_key()
    await store.add_key(tenant, key.key_id, key.key_hash, key.created_at)
    return IssuedKey(name=tenant, key_id=key.key_id, api_key=key.api_key)
