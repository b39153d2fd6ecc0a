"""Typed results: pydantic models of the server's responses (docs/http-api.md).

Unknown fields are kept (`extra="allow"`), so a newer server never breaks an older SDK.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class Usage(_Model):
    prompt_tokens: int
    completion_tokens: int
    prefix_tokens: int = 0


class PrefixRef(_Model):
    """The prefix version a generation actually used."""

    id: str
    version: int


class Timings(_Model):
    queue_s: float | None = None  # arrival -> admitted into the running batch
    ttft_s: float | None = None  # arrival -> first token (None if none was produced)
    total_s: float | None = None  # arrival -> finished


class Generation(_Model):
    """The result of `generate`, and of a stream once it is done."""

    id: str
    text: str
    finish_reason: str  # "stop" | "length" | "cancelled" | "error"
    usage: Usage
    prefix: PrefixRef | None = None
    timings: Timings | None = None


class ModelRef(_Model):
    """The base model a prefix was made for."""

    architecture: str | None = None
    digest: str | None = None


class PrefixInfo(_Model):
    """One stored version of a prefix."""

    name: str
    version: int
    tenant: str | None = None
    form: str  # "p_theta" | "kv"
    prefix_len: int
    dtype: str
    sha256: str
    size_bytes: int
    created_at: float
    description: str = ""
    training: dict[str, Any] = {}
    model: ModelRef | None = None
    compatible: bool = True  # False: made for another base model; the server can't use it
    incompatible_reason: str | None = None


class PrefixDetail(PrefixInfo):
    """The latest version of a prefix plus every stored version."""

    versions: list[PrefixInfo] = []


class PrefixPage(_Model):
    items: list[PrefixInfo]
    next_cursor: str | None = None


class ApiKey(_Model):
    """A new tenant key; `api_key` is shown once and stored hashed by the server."""

    name: str
    key_id: str
    api_key: str


class KeyInfo(_Model):
    key_id: str
    created_at: float | None = None


class Tenant(_Model):
    name: str
    keys: list[KeyInfo] = []


class TenantDeletion(_Model):
    """What deleting a tenant removed: its keys (revoked at once) and prefix versions."""

    name: str
    keys: int
    prefixes: int


class Health(_Model):
    """`/health`: "ok", or (with status 503) "engine_dead" and why."""

    status: str
    detail: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class Readiness(_Model):
    """`/ready`: `status` is "ready" when every check is "ok"."""

    status: str
    checks: dict[str, str] = {}

    @property
    def ok(self) -> bool:
        return self.status == "ready"


class QuotaValues(_Model):
    """A tenant's quota in force; None = no limit."""

    weight: float = 1.0  # fair-share weight: 2 gets twice the service of 1
    max_running: int | None = None  # requests running at once
    max_queued: int | None = None  # requests waiting; beyond it, 429 tenant_queue_full
    tokens_per_minute: int | None = None  # prompt + generated; beyond it, 429 rate_limited
    max_prefixes: int | None = None  # prefix names stored; beyond it, 403 quota_exceeded
    max_stored_bytes: int | None = None  # tensor bytes of all stored versions; likewise


class StorageUsage(_Model):
    prefixes: int  # prefix names with at least one stored version
    stored_bytes: int  # tensor bytes of every stored version


class TenantQuota(_Model):
    """`quota` is in force; `overrides` are the fields set for this tenant (the others are the
    server's defaults); `usage` is what the tenant stores."""

    name: str
    quota: QuotaValues
    overrides: dict[str, int | float] = {}  # ints stay ints: 3 running, not 3.0
    usage: StorageUsage | None = None


class NotGiven:
    """The default of an argument left out, where None has a meaning of its own."""

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "NOT_GIVEN"


NOT_GIVEN = NotGiven()
