"""The prefix registry: artifact format, importers, validation and the stores (Redis, local dir).

It knows tensors and bytes, not engines or HTTP (it never imports `server`), and it is the only
package that talks to Redis. See docs/registry.md.

Names are imported lazily, so `import prefix_registry.fingerprint` stays light (no torch).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prefix_registry.artifact import PrefixArtifact, PrefixMeta, content_hash
    from prefix_registry.cache import CachedStore
    from prefix_registry.errors import (
        ApiKeyNotFoundError,
        ConflictError,
        FingerprintMismatchError,
        InvalidPrefixError,
        InvalidQuotaError,
        NotFoundError,
        PrefixNotFoundError,
        PrefixTooLargeError,
        QuotaExceededError,
        RegistryError,
        RegistryUnavailableError,
        TenantNotFoundError,
        UnsafeFileError,
    )
    from prefix_registry.factory import open_store
    from prefix_registry.fingerprint import ModelFingerprint
    from prefix_registry.formats import (
        ImportedPrefix,
        artifact_from_path,
        import_files,
        import_path,
    )
    from prefix_registry.quotas import StorageLimits, TenantQuota, TenantUsage
    from prefix_registry.store import ApiKeyInfo, Page, PrefixStore, TenantInfo
    from prefix_registry.validation import Limits, parse_ref, validate_name

_LAZY = {
    "ApiKeyInfo": "prefix_registry.store",
    "ApiKeyNotFoundError": "prefix_registry.errors",
    "CachedStore": "prefix_registry.cache",
    "ConflictError": "prefix_registry.errors",
    "FingerprintMismatchError": "prefix_registry.errors",
    "ImportedPrefix": "prefix_registry.formats",
    "InvalidPrefixError": "prefix_registry.errors",
    "InvalidQuotaError": "prefix_registry.errors",
    "Limits": "prefix_registry.validation",
    "ModelFingerprint": "prefix_registry.fingerprint",
    "NotFoundError": "prefix_registry.errors",
    "Page": "prefix_registry.store",
    "PrefixArtifact": "prefix_registry.artifact",
    "PrefixMeta": "prefix_registry.artifact",
    "PrefixNotFoundError": "prefix_registry.errors",
    "PrefixStore": "prefix_registry.store",
    "PrefixTooLargeError": "prefix_registry.errors",
    "QuotaExceededError": "prefix_registry.errors",
    "RegistryError": "prefix_registry.errors",
    "RegistryUnavailableError": "prefix_registry.errors",
    "StorageLimits": "prefix_registry.quotas",
    "TenantInfo": "prefix_registry.store",
    "TenantNotFoundError": "prefix_registry.errors",
    "TenantQuota": "prefix_registry.quotas",
    "TenantUsage": "prefix_registry.quotas",
    "UnsafeFileError": "prefix_registry.errors",
    "artifact_from_path": "prefix_registry.formats",
    "content_hash": "prefix_registry.artifact",
    "import_files": "prefix_registry.formats",
    "import_path": "prefix_registry.formats",
    "open_store": "prefix_registry.factory",
    "parse_ref": "prefix_registry.validation",
    "validate_name": "prefix_registry.validation",
}

__all__ = [
    "ApiKeyInfo",
    "ApiKeyNotFoundError",
    "CachedStore",
    "ConflictError",
    "FingerprintMismatchError",
    "ImportedPrefix",
    "InvalidPrefixError",
    "InvalidQuotaError",
    "Limits",
    "ModelFingerprint",
    "NotFoundError",
    "Page",
    "PrefixArtifact",
    "PrefixMeta",
    "PrefixNotFoundError",
    "PrefixStore",
    "PrefixTooLargeError",
    "QuotaExceededError",
    "RegistryError",
    "RegistryUnavailableError",
    "StorageLimits",
    "TenantInfo",
    "TenantNotFoundError",
    "TenantQuota",
    "TenantUsage",
    "UnsafeFileError",
    "artifact_from_path",
    "content_hash",
    "import_files",
    "import_path",
    "open_store",
    "parse_ref",
    "validate_name",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'prefix_registry' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
