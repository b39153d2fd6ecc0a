"""Who is calling: the operator, a tenant, or (auth disabled) the development principal.

- The operator key (`--admin-key`) is compared in constant time (`hmac.compare_digest`).
- Tenant keys are random, shown once, and stored only as their sha256 hex digest; a request's key
  is hashed and looked up by hash in the registry (so no comparison against stored secrets).
- With auth disabled every request is tenant `default` with operator rights.
- Each refusal says why in the access log and in `prefix_serve_request_errors{type=...}`
  (`missing_key`, `malformed_key`, `invalid_key`, `operator_only`, `other_tenant`); the body keeps
  the SDK's type (`authentication_error` 401, `permission_denied` 403) and says why in words.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from server.errors import AuthenticationError, PermissionDeniedError, ServeError

# Why a request was refused (`rejection_type`): what the access log and the error metric say.
MISSING_KEY = "missing_key"
MALFORMED_KEY = "malformed_key"
INVALID_KEY = "invalid_key"  # unknown, revoked, or its tenant deleted: the same to the caller
OPERATOR_ONLY = "operator_only"
OTHER_TENANT = "other_tenant"

DEFAULT_TENANT = "default"
KEY_PREFIX = "psk-"  # makes a leaked key recognisable in logs and secret scanners


class KeyRefused(AuthenticationError):
    """401 with the reason it was refused (the body's type stays `authentication_error`)."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


class AccessRefused(PermissionDeniedError):
    """403 with the reason it was refused (the body's type stays `permission_denied`)."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


def rejection_type(error: ServeError) -> str:
    """The `error_type` for the access log and the error metric: why an auth refusal happened,
    else the error's own type."""
    if isinstance(error, KeyRefused | AccessRefused) and error.reason:
        return error.reason
    return error.type


@dataclass(frozen=True)
class Principal:
    tenant: str | None  # the key's tenant; None for the operator key
    is_operator: bool

    def require_operator(self) -> None:
        if not self.is_operator:
            raise AccessRefused("this route needs the operator key", OPERATOR_ONLY)

    def tenant_for(self, requested: str | None) -> str:
        """The tenant a call acts for: a tenant key acts for its own tenant only; the operator
        acts for `requested` (default: the `default` tenant)."""
        if self.is_operator:
            return requested or self.tenant or DEFAULT_TENANT
        assert self.tenant is not None  # tenant principals always carry their tenant
        if requested not in (None, self.tenant):
            raise AccessRefused("a tenant key can only act for its own tenant", OTHER_TENANT)
        return self.tenant


OPERATOR = Principal(tenant=None, is_operator=True)
DEVELOPMENT = Principal(tenant=DEFAULT_TENANT, is_operator=True)

KeyLookup = Callable[[str], Awaitable[str | None]]  # key hash -> tenant name or None


@dataclass(frozen=True)
class IssuedKeyMaterial:
    key_id: str
    api_key: str  # shown once
    key_hash: str  # what is stored
    created_at: float


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()


def issue_key() -> IssuedKeyMaterial:
    """A fresh random tenant key with its id and stored hash."""
    api_key = KEY_PREFIX + secrets.token_urlsafe(32)
    key_id = "key-" + secrets.token_hex(8)
    return IssuedKeyMaterial(key_id, api_key, hash_key(api_key), time.time())


class Authenticator:
    def __init__(self, *, admin_key: str | None, disabled: bool, lookup: KeyLookup) -> None:
        self._admin_key = admin_key.encode("utf-8") if admin_key else None
        self._disabled = disabled
        self._lookup = lookup

    async def authenticate(self, authorization: str | None) -> Principal:
        """The principal for an `Authorization` header value; 401 when missing or unknown."""
        if self._disabled:
            return DEVELOPMENT
        token = _bearer_token(authorization)
        if self._admin_key is not None and hmac.compare_digest(
            token.encode("utf-8"), self._admin_key
        ):
            return OPERATOR
        tenant = await self._lookup(hash_key(token))
        if tenant is None:
            raise KeyRefused("invalid API key", INVALID_KEY)
        return Principal(tenant=tenant, is_operator=False)


def _bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise KeyRefused("missing API key: send 'Authorization: Bearer <key>'", MISSING_KEY)
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise KeyRefused("malformed Authorization header: expected 'Bearer <key>'",
                         MALFORMED_KEY)
    return token
