"""Prefix management: upload (multipart, size-limited as it streams), list, show, delete.

A tenant key manages its own tenant's prefixes; the operator names the tenant (`tenant` form field
on upload, `?tenant=` elsewhere; default `default`). Listings mark a version made for another base
model (`compatible: false` and the reason): it is kept, but this server cannot use it. A version
whose stored record is corrupt is left out of listings (the store logs it); reading it alone is a
500 `corrupt_record`. A retried upload is answered with the version it made (201, same body).
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Query, Request

from prefix_registry.artifact import PrefixArtifact, PrefixMeta
from prefix_registry.fingerprint import ModelFingerprint
from prefix_registry.formats import import_files
from prefix_registry.store import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from server.api.deps import PrincipalDep, ServicesDep, StoreDep, acting_tenant
from server.api.errors import error_responses
from server.api.middleware import annotate
from server.api.prefix_checks import check_servable
from server.api.schemas import DeletedOut, PrefixDetail, PrefixInfo, PrefixPage
from server.api.state import Services
from server.api.uploads import UploadForm, read_upload
from server.errors import ValidationError

router = APIRouter(prefix="/admin/prefixes", tags=["prefixes"])
_ERRORS = error_responses(401, 403, 404, 422, 503)
TenantQuery = Annotated[str | None, Query(description="operator key only: whose prefixes")]

_UPLOAD_BODY = {
    "required": True,
    "content": {"multipart/form-data": {"schema": {
        "type": "object",
        "required": ["name", "file"],
        "properties": {
            "name": {"type": "string", "description": "the prefix name"},
            "description": {"type": "string"},
            "tenant": {"type": "string", "description": "operator key only: the owner"},
            "file": {"type": "array", "items": {"type": "string", "format": "binary"},
                     "description": "artifact, raw safetensors, PEFT adapter files or archive"},
        },
    }}},
}


@router.post(
    "", status_code=201, response_model=PrefixInfo, openapi_extra={"requestBody": _UPLOAD_BODY},
    responses={**_ERRORS, **error_responses(400, 413)},
    summary="Upload a new prefix version (within the tenant's prefix count and stored bytes)",
)
async def upload_prefix(
    request: Request, principal: PrincipalDep, services: ServicesDep
) -> PrefixInfo:
    form = await read_upload(request, services.settings.max_upload_bytes)
    tenant = acting_tenant(request, principal, form.fields.get("tenant"))
    artifact = await asyncio.to_thread(_artifact_of, form, tenant, services)
    quota = await services.quotas.get(tenant)
    meta = await services.store.put(artifact, limits=quota.storage_limits())
    # Only now is the tenant known to exist: a name the operator made up never becomes a label.
    annotate(request, tenant=tenant, prefix=meta.ref)
    return info_of(meta, services.loaded.fingerprint)


@router.get("", response_model=PrefixPage, responses=_ERRORS, summary="List prefixes (latest)")
async def list_prefixes(
    request: Request, principal: PrincipalDep, services: ServicesDep, tenant: TenantQuery = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = DEFAULT_PAGE_SIZE,
    cursor: str | None = None,
) -> PrefixPage:
    owner = acting_tenant(request, principal, tenant)
    page = await services.store.list(owner, limit=limit, cursor=cursor)
    served = services.loaded.fingerprint
    return PrefixPage(items=[info_of(m, served) for m in page.items], next_cursor=page.next_cursor)


@router.get("/{name}", response_model=PrefixDetail, responses=_ERRORS,
            summary="A prefix's latest version and all its versions")
async def get_prefix(
    name: str, request: Request, principal: PrincipalDep, services: ServicesDep,
    tenant: TenantQuery = None,
) -> PrefixDetail:
    versions = await services.store.versions(acting_tenant(request, principal, tenant), name)
    newest_first = [info_of(m, services.loaded.fingerprint) for m in reversed(versions)]
    return PrefixDetail(**newest_first[0].model_dump(), versions=newest_first)


@router.delete("/{name}", response_model=DeletedOut, responses=_ERRORS,
               summary="Delete a prefix (all versions, or ?version=N)")
async def delete_prefix(
    name: str, request: Request, principal: PrincipalDep, store: StoreDep,
    tenant: TenantQuery = None, version: Annotated[int | None, Query(ge=1)] = None,
) -> DeletedOut:
    deleted = await store.delete(acting_tenant(request, principal, tenant), name, version)
    return DeletedOut(deleted=deleted)


def _artifact_of(form: UploadForm, tenant: str, services: Services) -> PrefixArtifact:
    """Recognise, validate and wrap the uploaded files (CPU work: runs in a thread)."""
    name = form.fields.get("name")
    if not name:
        raise ValidationError("missing form field 'name'")
    if not form.files:
        raise ValidationError("no 'file' part: upload at least one prefix file")
    model, limits = services.loaded.fingerprint, services.store.limits
    imported = import_files(form.files, model=model, limits=limits)
    artifact = imported.to_artifact(
        name=name, tenant=tenant, model=model, limits=limits,
        description=form.fields.get("description"),
    )
    context = services.settings.max_seq_len or services.loaded.max_context
    check_servable(services.loaded, artifact, context)
    return artifact


def info_of(meta: PrefixMeta, served: ModelFingerprint) -> PrefixInfo:
    """The wire form of a stored version, marked unusable when made for another model."""
    problem = served.mismatch(meta.model)
    return PrefixInfo(**meta.to_dict(), compatible=problem is None, incompatible_reason=problem)
