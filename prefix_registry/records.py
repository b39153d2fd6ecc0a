"""Records read back from a store are checked like an upload before anything uses them.

A store's bytes can go bad without any client's help: a bit flip, a truncated write, an operator's
hand edit, another program sharing the Redis, a restored backup of another layout. Whatever was
read is held to the upload's rules (`validation.py`, `PrefixArtifact.validate`, the same `Limits`)
and to the place it was read from (the blob of `acme/style@3` must say tenant `acme`, name
`style`, version 3). A record that fails raises `CorruptRecordError`, naming and logging its key:
only the request that read it fails, with a server-side error (never a 4xx blaming the caller),
and a listing leaves the record out (`skip_corrupt`) instead of failing as a whole.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from typing import Any, TypeVar

from prefix_registry import safe_json
from prefix_registry.artifact import PrefixArtifact, PrefixMeta, check_extras
from prefix_registry.errors import CorruptRecordError, InvalidPrefixError, PrefixTooLargeError
from prefix_registry.validation import ALLOWED_DTYPES, FORMS, NAME_RE, Limits

log = logging.getLogger(__name__)
T = TypeVar("T")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_RECORD_BYTES = 2**20  # a tenant, key or meta record is under a KB; a meta with training JSON
_DTYPES = set(ALLOWED_DTYPES.values())


def corrupt(key: str, problem: str) -> CorruptRecordError:
    """The error for a bad record, logged here with its key (once per read)."""
    log.error("corrupt record %s: %s", key, problem)
    return CorruptRecordError(f"stored record {key} is corrupt: {problem}", key)


def artifact_record(blob: bytes, *, key: str, tenant: str, name: str, version: int,
                    limits: Limits) -> PrefixArtifact:
    """Parse and fully validate a stored blob (tensors, metadata, content hash, limits) that was
    read as `tenant/name@version`."""
    try:
        artifact = PrefixArtifact.from_bytes(blob, limits=limits)
    except (InvalidPrefixError, PrefixTooLargeError) as e:
        raise corrupt(key, e.message) from e
    check_place(artifact.meta, key=key, tenant=tenant, name=name, version=version)
    return artifact


def meta_record(raw: bytes | str, *, key: str, tenant: str, name: str, version: int | None,
                limits: Limits) -> PrefixMeta:
    """Parse and check a stored metadata JSON read as `tenant/name` (`@version` when known)."""
    if len(raw) > MAX_RECORD_BYTES:
        raise corrupt(key, f"{len(raw)} bytes, over {MAX_RECORD_BYTES}")
    try:
        meta = PrefixMeta.from_dict(safe_json.loads_object(raw, "the metadata"))
    except InvalidPrefixError as e:
        raise corrupt(key, e.message) from e
    return checked_meta(meta, key=key, tenant=tenant, name=name, version=version, limits=limits)


def checked_meta(meta: PrefixMeta, *, key: str, tenant: str, name: str, version: int | None,
                 limits: Limits) -> PrefixMeta:
    """`meta` if every field is one an upload could have stored, at this place."""
    problem = meta_problem(meta, limits)
    if problem is not None:
        raise corrupt(key, problem)
    check_place(meta, key=key, tenant=tenant, name=name, version=version)
    return meta


def meta_problem(meta: PrefixMeta, limits: Limits) -> str | None:
    """What makes `meta` one no upload could have stored, or None."""
    if not 1 <= meta.prefix_len <= limits.max_prefix_len:
        return f"prefix_len {meta.prefix_len} is outside 1..{limits.max_prefix_len}"
    if meta.form not in FORMS or meta.dtype not in _DTYPES:
        return f"form {meta.form!r} / dtype {meta.dtype!r} is not one the registry stores"
    if not 0 < meta.size_bytes <= limits.max_prefix_bytes:
        return f"size_bytes {meta.size_bytes} is outside 1..{limits.max_prefix_bytes}"
    if not SHA256_RE.match(meta.sha256):
        return "sha256 is not 64 lowercase hex digits"
    if meta.version < 1 or not math.isfinite(meta.created_at):
        return f"version {meta.version} / created_at {meta.created_at} is not a stored one"
    try:
        check_extras(meta.description, meta.training)
    except InvalidPrefixError as e:
        return e.message
    return None


def check_place(meta: PrefixMeta, *, key: str, tenant: str, name: str,
                version: int | None) -> None:
    """The record names the tenant, name and version it was read as (a record copied from
    elsewhere, another tenant's included, is refused)."""
    if (meta.tenant, meta.name) != (tenant, name) or version not in (None, meta.version):
        where = f"{meta.tenant}/{meta.name}@{meta.version}"
        raise corrupt(key, f"it says {where!r}, but was read as {tenant}/{name}@{version}")


def json_record(raw: bytes | str | None, *, key: str, fields: dict[str, type]) -> dict[str, Any]:
    """A small JSON object record (tenant, API key, key hash) with `fields` of these types."""
    if raw is None or len(raw) > MAX_RECORD_BYTES:
        raise corrupt(key, "missing or over a MiB")
    try:
        record = safe_json.loads_object(raw, "the record")
    except InvalidPrefixError as e:
        raise corrupt(key, e.message) from e
    for field, kind in fields.items():
        value = record.get(field)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = record[field] = float(value)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise corrupt(key, f"field {field!r} is not a {kind.__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise corrupt(key, f"field {field!r} is not finite")
    return record


def name_field(record: dict[str, Any], field: str, key: str) -> str:
    """A record's field that must be a valid name (a tenant or key id)."""
    value = record.get(field)
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise corrupt(key, f"field {field!r} is not a valid name")
    return value


def skip_corrupt(read: Callable[[], T]) -> T | None:
    """`read()`, or None when the record is corrupt (already logged): for listings."""
    try:
        return read()
    except CorruptRecordError:
        return None
