"""Per-tenant quotas as the registry stores them, and the storage limits a put must respect.

The operator sets a tenant's quota field by field; a field that is not set takes the server's
default (the server combines the two, the registry stores only what was set). The registry also
enforces the storage fields itself, atomically with the write: `put(..., limits=StorageLimits)`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from prefix_registry.errors import InvalidQuotaError, QuotaExceededError

log = logging.getLogger(__name__)

QuotaValue = int | float

# field -> (type, minimum, maximum): what an operator may set.
QUOTA_BOUNDS: dict[str, tuple[type, float, float]] = {
    "weight": (float, 0.001, 1000.0),  # fair-share weight (a tenant with 2 gets twice the service)
    "max_running": (int, 1, 1_000_000),  # requests running at once
    "max_queued": (int, 1, 1_000_000),  # requests waiting for admission
    "tokens_per_minute": (int, 1, 10**12),  # prompt + generated tokens per minute
    "max_prefixes": (int, 0, 10**9),  # prefix names stored (each with any number of versions)
    "max_stored_bytes": (int, 0, 2**53),  # tensor bytes of every stored version together
}


@dataclass(frozen=True)
class TenantQuota:
    """What the operator set for one tenant; None = not set (the server's default applies)."""

    weight: float | None = None
    max_running: int | None = None
    max_queued: int | None = None
    tokens_per_minute: int | None = None
    max_prefixes: int | None = None
    max_stored_bytes: int | None = None

    def to_dict(self) -> dict[str, QuotaValue]:
        """The fields that are set."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "") -> TenantQuota:
        """From stored fields. Unknown fields (from a newer server) are ignored, and so is a
        value that is no longer valid (logged with the record's key `where`): a stored record
        must never fail requests."""
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        if not isinstance(data, Mapping):
            log.warning("ignoring corrupt quota record %s: not a mapping", where)
            return cls()
        for key, value in data.items():
            try:
                if key in known:
                    values[key] = check_quota_value(key, value)
            except InvalidQuotaError as exc:
                log.warning("ignoring a stored quota value of %s: %s", where, exc.message)
        return cls(**values)

    @classmethod
    def from_stored(cls, raw: Mapping[Any, Any], where: str) -> TenantQuota:
        """From a stored record of field -> JSON text (bytes or str). A field whose text is not
        JSON, or whose value is not valid, is ignored and logged with the record's key `where`:
        that field falls back to the server's default, the tenant's other fields still apply,
        and the tenant's requests go on (never a 500 for the store's bad data)."""
        data: dict[str, Any] = {}
        for field, text in raw.items():
            name = field.decode(errors="replace") if isinstance(field, bytes) else str(field)
            try:
                data[name] = json.loads(text)
            except (ValueError, TypeError):  # UnicodeDecodeError is a ValueError
                log.warning("ignoring quota field %r of corrupt record %s: not JSON: %r",
                            name[:64], where, bytes(text[:64]) if isinstance(text, bytes)
                            else str(text)[:64])
        return cls.from_dict(data, where=where)

    def updated(self, changes: Mapping[str, QuotaValue | None]) -> TenantQuota:
        """This quota with `changes` applied (None clears a field)."""
        checked: dict[str, Any] = check_quota_changes(changes)
        return replace(self, **checked)


def check_quota_value(field: str, value: object) -> QuotaValue:
    """`value` as the field's type, or InvalidQuotaError naming the field and its range."""
    if field not in QUOTA_BOUNDS:
        raise InvalidQuotaError(f"unknown quota field {field!r}: use {', '.join(QUOTA_BOUNDS)}")
    kind, low, high = QUOTA_BOUNDS[field]
    number = _number(value)
    if number is None or not low <= number <= high or (kind is int and not number.is_integer()):
        what = "an integer" if kind is int else "a number"
        raise InvalidQuotaError(f"quota {field} must be {what} from {low:g} to {high:g}, "
                                f"not {value!r}"[:200])
    return int(number) if kind is int else number


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def check_quota_changes(changes: Mapping[str, object]) -> dict[str, QuotaValue | None]:
    """Validated changes: field -> value, or None to clear it."""
    return {k: None if v is None else check_quota_value(k, v) for k, v in changes.items()}


@dataclass(frozen=True)
class TenantUsage:
    prefixes: int  # names with at least one stored version
    stored_bytes: int  # `size_bytes` (raw tensor bytes) summed over every stored version


@dataclass(frozen=True)
class StorageLimits:
    """What one tenant may store; None = no limit. Checked by the store inside the write."""

    max_prefixes: int | None = None
    max_stored_bytes: int | None = None

    @property
    def unlimited(self) -> bool:
        return self.max_prefixes is None and self.max_stored_bytes is None

    def check(self, tenant: str, usage: TenantUsage, *, new_name: bool, size: int) -> None:
        """Raise QuotaExceededError if storing `size` more bytes (under a new name or not)
        would take `tenant` past a limit."""
        if new_name and self.max_prefixes is not None and usage.prefixes >= self.max_prefixes:
            raise prefix_count_exceeded(tenant, usage.prefixes, self.max_prefixes)
        limit = self.max_stored_bytes
        if limit is not None and usage.stored_bytes + size > limit:
            raise stored_bytes_exceeded(tenant, usage.stored_bytes, size, limit)


def prefix_count_exceeded(tenant: str, count: int, limit: int) -> QuotaExceededError:
    return QuotaExceededError(
        f"tenant {tenant!r} may store at most {limit} prefixes and has {count}: delete one, or "
        "upload a new version of an existing name"
    )


def stored_bytes_exceeded(tenant: str, used: int, size: int, limit: int) -> QuotaExceededError:
    return QuotaExceededError(
        f"tenant {tenant!r} may store at most {limit} bytes of prefixes; it stores {used} and "
        f"this version needs {size}: delete old versions first"
    )
