"""(tenant, prefix ref) -> the engine's `PrefixSource`.

Artifacts come through the registry's `CachedStore`: kept in-process (LRU by tensor bytes) per
(tenant, ref) and dropped when the registry announces a change to that (tenant, name) from any
process, or a reset. Another tenant's prefix is answered exactly like a missing one. The store
checks what it reads like an upload (`prefix_registry/records.py`): a corrupt record is a
`CorruptRecordError` (500 `corrupt_record`) for this request only, and is never cached, so the
engine never sees it.
"""

from __future__ import annotations

from prefix_registry import errors as reg
from prefix_registry.artifact import PrefixArtifact
from prefix_registry.cache import CachedStore
from prefix_registry.errors import excerpt
from prefix_registry.fingerprint import ModelFingerprint
from prefix_registry.store import PrefixStore
from prefix_registry.validation import parse_ref
from server.engine.request import PrefixSource
from server.errors import IncompatiblePrefixError, NotFoundError


class PrefixResolver:
    def __init__(
        self, store: PrefixStore, *, fingerprint: ModelFingerprint, max_bytes: int
    ) -> None:
        self._cache = CachedStore(store, max_bytes=max_bytes)
        self._fingerprint = fingerprint

    async def start(self) -> None:
        """Subscribe to the registry's change announcements."""
        await self._cache.start()

    async def close(self) -> None:
        await self._cache.close()

    async def resolve(self, tenant: str, ref: str) -> PrefixSource:
        """The prefix `ref` of `tenant`: 404 if it is not that tenant's, 422 if malformed or
        made for another model, 500 `corrupt_record` if its stored record is bad."""
        parse_ref(ref)  # a malformed ref is a 422 (InvalidPrefixError), not a 404
        try:
            artifact = await self._cache.get(tenant, ref)
        except reg.NotFoundError as exc:
            raise NotFoundError(f"prefix {excerpt(ref)} not found") from exc
        problem = self._fingerprint.mismatch(artifact.meta.model)
        if problem is not None:
            raise IncompatiblePrefixError(f"prefix {excerpt(ref)} can't be used: {problem}")
        return to_source(artifact)

    def __len__(self) -> int:
        return len(self._cache)


def to_source(artifact: PrefixArtifact) -> PrefixSource:
    meta = artifact.meta
    return PrefixSource(
        content_hash=meta.sha256,
        name=meta.name,
        version=meta.version,
        form=meta.form,
        prefix_len=meta.prefix_len,
        tensors=artifact.tensors,
        fingerprint=meta.model,
    )
