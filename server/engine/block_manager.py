"""KV blocks: who holds which, shared read-only prefix blocks, and the LRU of idle prefixes.

Pure Python (no torch): the KV pool (`kv_pool.py`) holds `num_blocks` blocks of `block_size` token
slots each; this module decides which block ids hold what.
- A running request holds a block table for its *own* tokens (prompt, then generated), grown one
  block at a time as it needs them; it never reserves its maximum length. The tables live here,
  keyed by request id (vLLM v1's `req_to_blocks`): nothing else holds or edits a block list, and
  the scheduler copies them into each step's frozen plan.
- A prefix's K/V live in blocks written once and shared by every running request that uses it,
  counted by `holders`. KV memory in use is therefore Σ(distinct prefixes) + Σ(own tokens, rounded
  up to a block), never prefix length × requests.
- A prefix whose last holder left stays cached (idle, LRU) until an allocation needs its blocks.
  A held prefix is never evicted.
Free blocks are handed out lowest id first, so the blocks in use stay packed at the low end.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class PrefixKey:
    """What identifies a prefix's K/V: same form, content and length, same K/V."""

    form: str
    content_hash: str
    length: int


@dataclass(eq=False)
class PrefixBlocks:
    """One prefix's K/V in the pool: `length` tokens in `blocks` (the last one may be partial)."""

    key: PrefixKey
    length: int
    blocks: list[int]
    holders: int = 0  # running requests that read these blocks
    written: bool = False  # its K/V are in the blocks (the engine writes them once)


@dataclass(frozen=True)
class BlockStats:
    total: int  # blocks in the pool
    used: int  # held by requests or by held prefixes
    prefix: int  # holding prefix K/V (held or idle)
    idle_prefix: int  # holding idle cached prefixes (reclaimable)
    prefix_entries: int
    prefix_hits: int
    prefix_misses: int
    prefix_evictions: int


@dataclass
class _Counters:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free: list[int] = list(range(num_blocks))  # a heap: lowest id first
        self._tables: dict[str, list[int]] = {}  # request id -> its own block table
        self._held: dict[str, PrefixBlocks] = {}  # request id -> the prefix entry it holds
        self._prefixes: dict[PrefixKey, PrefixBlocks] = {}
        self._idle: OrderedDict[PrefixKey, PrefixBlocks] = OrderedDict()  # LRU first
        self._idle_blocks = 0
        self._counters = _Counters()
        self._prefix_blocks = 0
        self.high_water = 0  # 1 + the highest block id ever handed out

    # -- sizes --------------------------------------------------------------------------------

    def blocks_for(self, tokens: int) -> int:
        """Blocks that `tokens` token slots need."""
        return -(-tokens // self.block_size)

    @property
    def num_free(self) -> int:
        """Blocks an allocation can get: free ones plus those of idle cached prefixes."""
        return len(self._free) + self._idle_blocks

    def stats(self) -> BlockStats:
        c = self._counters
        return BlockStats(
            total=self.num_blocks, used=self.num_blocks - self.num_free,
            prefix=self._prefix_blocks, idle_prefix=self._idle_blocks,
            prefix_entries=len(self._prefixes), prefix_hits=c.hits, prefix_misses=c.misses,
            prefix_evictions=c.evictions,
        )

    # -- request blocks -----------------------------------------------------------------------

    def table(self, request_id: str) -> tuple[int, ...]:
        """The request's own block table (empty when it holds none)."""
        return tuple(self._tables.get(request_id, ()))

    def held(self, request_id: str) -> int:
        """Own blocks the request holds."""
        return len(self._tables.get(request_id, ()))

    def grow(self, request_id: str, tokens: int) -> bool:
        """Give the request blocks until its table holds `tokens` slots; False (and nothing
        taken) when the pool cannot."""
        table = self._tables.setdefault(request_id, [])
        need = self.blocks_for(tokens) - len(table)
        if need <= 0:
            return True
        if need > self.num_free:
            return False
        table.extend(self._take(need))
        return True

    def free(self, request_id: str) -> None:
        """Return the request's own blocks to the pool and let go of its prefix."""
        for block in self._tables.pop(request_id, ()):
            heapq.heappush(self._free, block)
        entry = self._held.pop(request_id, None)
        if entry is not None:
            self.release_prefix(entry)

    # -- prefix blocks ------------------------------------------------------------------------

    def prefix_cost(self, key: PrefixKey) -> int:
        """Blocks acquiring `key` would take from the free ones: none when it is held, its
        blocks when it is idle (they stop being reclaimable), new blocks when absent."""
        entry = self._prefixes.get(key)
        if entry is None:
            return self.blocks_for(key.length)
        return 0 if entry.holders else len(entry.blocks)

    def acquire_prefix(self, key: PrefixKey) -> PrefixBlocks | None:
        """Hold the prefix `key`. A hit shares its blocks; a miss allocates blocks for its
        length (`written` False: the caller writes the K/V). None when there is no room."""
        entry = self._prefixes.get(key)
        if entry is not None:
            if entry.holders == 0:
                del self._idle[key]
                self._idle_blocks -= len(entry.blocks)
            entry.holders += 1
            self._counters.hits += 1
            return entry
        length = key.length
        need = self.blocks_for(length)
        if need > self.num_free:
            return None
        entry = PrefixBlocks(key, length, self._take(need), holders=1)
        self._prefixes[key] = entry
        self._prefix_blocks += need
        self._counters.misses += 1
        return entry

    def hold_prefix(self, request_id: str, key: PrefixKey) -> PrefixBlocks | None:
        """`acquire_prefix` on behalf of a request: `free(request_id)` lets go of it."""
        if request_id in self._held:
            raise ValueError(f"request {request_id!r} already holds a prefix")
        entry = self.acquire_prefix(key)
        if entry is not None:
            self._held[request_id] = entry
        return entry

    def prefix_of(self, request_id: str) -> PrefixBlocks | None:
        """The prefix entry the request holds, if any."""
        return self._held.get(request_id)

    def is_written(self, key: PrefixKey) -> bool:
        entry = self._prefixes.get(key)
        return entry is not None and entry.written

    def prefix_blocks(self, key: PrefixKey) -> tuple[int, ...]:
        """The blocks holding the prefix `key` (empty when it is not in the pool)."""
        entry = self._prefixes.get(key)
        return tuple(entry.blocks) if entry is not None else ()

    def written(self, key: PrefixKey) -> None:
        """The prefix's K/V are in its blocks: it may stay cached once idle."""
        self._prefixes[key].written = True

    def release_prefix(self, entry: PrefixBlocks) -> None:
        """One holder left; the last one leaves the prefix cached (idle) for the next request."""
        entry.holders -= 1
        if entry.holders == 0:
            if not entry.written:  # never written (its K/V failed): nothing to keep
                return self._drop(entry)
            self._idle[entry.key] = entry
            self._idle_blocks += len(entry.blocks)

    def drop_prefix(self, key: PrefixKey) -> None:
        """Forget a prefix whose K/V could not be computed; its holders must release it too."""
        entry = self._prefixes.get(key)
        if entry is not None and entry.holders == 0:
            self._drop(entry)

    # -- internals ----------------------------------------------------------------------------

    def _take(self, n: int) -> list[int]:
        if n <= 0:  # nothing to take (Engine.submit refuses a prefix of length < 1 anyway)
            return []
        while len(self._free) < n:
            self._evict_one()
        taken = [heapq.heappop(self._free) for _ in range(n)]
        self.high_water = max(self.high_water, taken[-1] + 1)
        return taken

    def _evict_one(self) -> None:
        key, entry = self._idle.popitem(last=False)
        self._idle_blocks -= len(entry.blocks)
        self._counters.evictions += 1
        self._drop(entry)

    def _drop(self, entry: PrefixBlocks) -> None:
        self._prefixes.pop(entry.key, None)
        self._prefix_blocks -= len(entry.blocks)
        for block in entry.blocks:
            heapq.heappush(self._free, block)
        entry.blocks = []

