"""Wire schemas of tenant quotas (`/admin/tenants/{name}/quota`, docs/tenants.md)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from prefix_registry.quotas import QUOTA_BOUNDS, QuotaValue


def _bounded(field: str, description: str) -> Any:
    _, low, high = QUOTA_BOUNDS[field]
    return Field(default=None, ge=low, le=high, allow_inf_nan=False, description=description)


class QuotaUpdate(BaseModel):
    """A field given sets the tenant's value; `null` clears it (back to the server's default);
    a field left out is unchanged."""

    model_config = ConfigDict(extra="forbid")

    weight: float | None = _bounded("weight", "fair-share weight: 2 gets twice the service of 1")
    max_running: int | None = _bounded("max_running", "requests running at once")
    max_queued: int | None = _bounded(
        "max_queued", "requests waiting for admission; beyond it, 429 for this tenant")
    tokens_per_minute: int | None = _bounded(
        "tokens_per_minute", "prompt + generated tokens per minute; beyond it, 429")
    max_prefixes: int | None = _bounded("max_prefixes", "prefix names stored")
    max_stored_bytes: int | None = _bounded(
        "max_stored_bytes", "tensor bytes of all stored prefix versions")

    def changes(self) -> dict[str, QuotaValue | None]:
        return self.model_dump(exclude_unset=True)


class QuotaValues(BaseModel):
    """The quota in force (null: no limit)."""

    weight: float
    max_running: int | None
    max_queued: int | None
    tokens_per_minute: int | None
    max_prefixes: int | None
    max_stored_bytes: int | None


class UsageOut(BaseModel):
    prefixes: int = Field(description="prefix names with at least one stored version")
    stored_bytes: int = Field(description="tensor bytes of every stored version")


class TenantQuotaOut(BaseModel):
    name: str
    quota: QuotaValues
    overrides: dict[str, QuotaValue] = Field(
        description="the fields set for this tenant; the others are the server's defaults")
    usage: UsageOut
