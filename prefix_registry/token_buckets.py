"""Tokens per minute per tenant: token buckets that a request reserves from at admission.

A bucket holds at most one minute's tokens and refills continuously at the tenant's rate. A
request takes its whole reservation (prompt + max new tokens) at once, and only when the bucket
holds all of it (or is full, for a request larger than one minute's tokens); what it did not use
is given back when it ends. Taking is one atomic check-and-take, so concurrent requests can never
spend the same tokens twice: over any window a tenant uses at most one minute's tokens plus the
refill, plus one oversized request's reservation.

Two homes with the same rule: `LocalTokenBuckets` (one process; the local store) and
`RedisTokenBuckets` (a Lua script in the registry's Redis, timed by the Redis clock, so every
server process shares one bucket per tenant).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from prefix_registry.redis_keys import Keys, text, unavailable

# A bucket full again needs no record; a drained one is kept until it would be full.
_TAKE_SCRIPT = """
local rate = tonumber(ARGV[1])
local want = tonumber(ARGV[2])
local force = ARGV[3] == '1'
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local saved = redis.call('HMGET', KEYS[1], 'level', 'at')
local level = tonumber(saved[1]) or rate
local at = tonumber(saved[2]) or now
level = math.min(rate, level + math.max(0, now - at) * rate / 60)
if not force and level < math.min(want, rate) then
  return {0, tostring(level)}
end
level = math.min(rate, level - want)
redis.call('HSET', KEYS[1], 'level', tostring(level), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((rate - level) * 60000 / rate) + 1000)
return {1, tostring(level)}
"""


@dataclass(frozen=True)
class Taken:
    """The outcome of one take: whether it was granted, and the tokens left after it."""

    granted: bool
    level: float  # may be below zero after an oversized request

    def wait_s(self, want: int, per_minute: int) -> float:
        """Seconds until a refused take of `want` could be granted."""
        return max(0.0, (min(want, per_minute) - self.level) * 60.0 / per_minute)


class TokenBuckets(Protocol):
    async def take(self, tenant: str, per_minute: int, tokens: int) -> Taken:
        """Take `tokens` from `tenant`'s bucket if it holds them all (or is full)."""
        ...

    async def give(self, tenant: str, per_minute: int, tokens: int) -> None:
        """Return `tokens` (unused reservation); a negative number takes more, unconditionally."""
        ...


@dataclass
class _Bucket:
    level: float  # tokens left; below zero after an oversized request
    at: float  # clock time of `level`

    def refill(self, now: float, per_minute: int) -> None:
        gained = max(0.0, now - self.at) * per_minute / 60.0
        self.level = min(float(per_minute), self.level + gained)
        self.at = now


class LocalTokenBuckets:
    """The buckets of one process (the module docstring's rule)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    async def take(self, tenant: str, per_minute: int, tokens: int) -> Taken:
        return self.take_now(tenant, per_minute, tokens)

    async def give(self, tenant: str, per_minute: int, tokens: int) -> None:
        bucket = self._bucket(tenant, per_minute)
        bucket.level = min(float(per_minute), bucket.level + tokens)

    def take_now(self, tenant: str, per_minute: int, tokens: int) -> Taken:
        bucket = self._bucket(tenant, per_minute)
        if bucket.level < min(tokens, per_minute):
            return Taken(False, bucket.level)
        bucket.level -= tokens
        return Taken(True, bucket.level)

    def level(self, tenant: str, per_minute: int) -> float:
        """Tokens `tenant` has left now."""
        return self._bucket(tenant, per_minute).level

    def _bucket(self, tenant: str, per_minute: int) -> _Bucket:
        now = self._clock()
        bucket = self._buckets.get(tenant)
        if bucket is None:
            bucket = self._buckets[tenant] = _Bucket(float(per_minute), now)
        bucket.refill(now, per_minute)
        return bucket


class RedisTokenBuckets:
    """The buckets in the registry's Redis, shared by every server (RegistryUnavailableError
    when Redis cannot be reached)."""

    def __init__(self, redis: Any, keys: Keys) -> None:
        self._keys = keys
        self._script = redis.register_script(_TAKE_SCRIPT)

    async def take(self, tenant: str, per_minute: int, tokens: int) -> Taken:
        return await self._run(tenant, per_minute, tokens, force=False)

    async def give(self, tenant: str, per_minute: int, tokens: int) -> None:
        await self._run(tenant, per_minute, -tokens, force=True)

    async def _run(self, tenant: str, per_minute: int, tokens: int, *, force: bool) -> Taken:
        key = f"{self._keys.tenant(tenant)}tokens-per-minute"  # the tenant's own slot
        with unavailable():
            granted, level = await self._script(
                keys=[key], args=[per_minute, tokens, "1" if force else "0"])
        left = float(text(level))
        return Taken(bool(int(granted)), left if math.isfinite(left) else 0.0)
