"""Tokens per minute per tenant: a token bucket that lets a tenant spend one minute's tokens at
once and refills continuously at its rate.

Tokens are counted as they are used (generated tokens as they stream, prompt tokens when the
request finishes), so a request is admitted while its tenant has at least one token left, and the
bucket may go below zero by what the running requests use; the tenant then waits until it has
refilled.
Averaged over minutes a tenant never exceeds its rate; its bursts are bounded by one minute's
tokens plus what its running requests use. Counted per server process.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from server.errors import RateLimitedError


@dataclass
class _Bucket:
    per_minute: int
    level: float  # tokens left; below zero after a burst
    at: float  # clock time of `level`

    def refill(self, now: float, per_minute: int) -> None:
        capacity = float(per_minute)
        self.level = min(capacity, self.level + (now - self.at) * per_minute / 60.0)
        self.per_minute, self.at = per_minute, now


class TokenRateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}  # tenants with a limit only

    def check(self, tenant: str, per_minute: int | None) -> None:
        """Raise RateLimitedError (429 with Retry-After) while `tenant` has less than one token."""
        if per_minute is None:
            self._buckets.pop(tenant, None)
            return
        now = self._clock()
        bucket = self._buckets.get(tenant)
        if bucket is None:
            bucket = self._buckets[tenant] = _Bucket(per_minute, float(per_minute), now)
        bucket.refill(now, per_minute)
        if bucket.level < 1:
            wait_s = (1.0 - bucket.level) * 60.0 / per_minute  # until one token is back
            raise RateLimitedError(
                f"tenant {tenant!r} used its {per_minute} tokens per minute; retry in "
                f"{max(1, math.ceil(wait_s))} s", retry_after=wait_s,
            )

    def charge(self, tenant: str, tokens: int) -> None:
        """`tenant` used `tokens` more (no-op for a tenant without a limit)."""
        bucket = self._buckets.get(tenant)
        if bucket is not None and tokens > 0:
            bucket.refill(self._clock(), bucket.per_minute)
            bucket.level -= tokens

    def level(self, tenant: str) -> float | None:
        """Tokens `tenant` has left now (None: no limit)."""
        bucket = self._buckets.get(tenant)
        if bucket is None:
            return None
        bucket.refill(self._clock(), bucket.per_minute)
        return bucket.level
