"""Prefix K/V on the model's device, computed once per content, bounded by bytes (LRU).

Keyed by `(form, content_hash)`: a replaced or deleted prefix has a new hash (or is never asked
for again), so stale K/V are never served; old entries simply age out. Requests in flight pin the
entry they use; eviction only ever takes unpinned entries. A prefix that cannot fit even after
evicting everything unpinned is used for its one request and not kept, so the budget is a hard
bound and nothing waits on the cache.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from server.engine.request import PrefixSource
from server.errors import IncompatiblePrefixError
from server.models.loader import LoadedModel
from server.models.prefix_kv import prefix_kv

Key = tuple[str, str]  # (form, content_hash)


@dataclass
class _Entry:
    keys: torch.Tensor  # [L, H_kv, P, hd], model dtype, on the model's device
    values: torch.Tensor
    nbytes: int
    pins: int = 0


@dataclass(frozen=True)
class PrefixCacheStats:
    hits: int
    misses: int
    evictions: int
    bytes: int
    entries: int


class PrefixCache:
    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()  # least recently used first
        self._bytes = self.hits = self.misses = self.evictions = 0

    def acquire(
        self,
        source: PrefixSource,
        compute: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """K/V of `source` (computing them on a miss). Returns (keys, values, pinned): when
        pinned, the caller must `release(source)` once its request is done."""
        key = (source.form, source.content_hash)
        entry = self._entries.get(key)
        if entry is not None:
            self.hits += 1
            self._entries.move_to_end(key)
            entry.pins += 1
            return entry.keys, entry.values, True
        self.misses += 1
        keys, values = compute()
        nbytes = (keys.numel() + values.numel()) * keys.element_size()
        if not self._make_room(nbytes):
            return keys, values, False
        self._entries[key] = _Entry(keys, values, nbytes, pins=1)
        self._bytes += nbytes
        return keys, values, True

    def lookup(
        self, loaded: LoadedModel, source: PrefixSource
    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """K/V [L, H, P, hd] of `source` for `loaded`'s model, as `acquire` returns them.

        Raises IncompatiblePrefixError (nothing pinned) when the prefix was made for another
        model, has the wrong shapes, or does not hold its declared number of tokens."""
        if source.fingerprint is not None:
            why = loaded.fingerprint.mismatch(source.fingerprint)
            if why is not None:
                raise IncompatiblePrefixError(f"prefix {source.name!r}: {why}")
        keys, values, pinned = self.acquire(source, lambda: _compute(loaded, source))
        if keys.shape[2] != source.prefix_len:
            if pinned:
                self.release(source)
            raise IncompatiblePrefixError(
                f"prefix {source.name!r} declares {source.prefix_len} tokens but holds "
                f"{keys.shape[2]}"
            )
        return keys, values, pinned

    def release(self, source: PrefixSource) -> None:
        entry = self._entries.get((source.form, source.content_hash))
        if entry is not None and entry.pins > 0:
            entry.pins -= 1

    def stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(
            self.hits, self.misses, self.evictions, self._bytes, len(self._entries)
        )

    def _make_room(self, nbytes: int) -> bool:
        """Evict unpinned entries, least recently used first, until `nbytes` fit."""
        pinned = sum(e.nbytes for e in self._entries.values() if e.pins > 0)
        if pinned + nbytes > self.budget:
            return False  # evicting would not help: keep what is there
        for key in list(self._entries):
            if self._bytes + nbytes <= self.budget:
                break
            entry = self._entries[key]
            if entry.pins == 0:
                del self._entries[key]
                self._bytes -= entry.nbytes
                self.evictions += 1
        return self._bytes + nbytes <= self.budget


def _compute(loaded: LoadedModel, source: PrefixSource) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the prefix through the model's key/value projections (engine thread, no grad)."""
    try:
        with torch.no_grad():
            return prefix_kv(loaded, source.form, source.tensors)
    except ValueError as exc:
        raise IncompatiblePrefixError(f"prefix {source.name!r}: {exc}") from exc
