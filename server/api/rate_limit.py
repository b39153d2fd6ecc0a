"""Tokens per minute per tenant, reserved at admission and settled when the request ends.

A request reserves its prompt tokens plus `max_new_tokens` before it reaches the engine, and is
refused (429 `rate_limited`, with Retry-After) unless its tenant's bucket holds all of it, or
is full for a request larger than one minute's tokens (the rule: prefix_registry/token_buckets.py).
When the request ends, whatever ended it (finished, stopped early, cancelled by a client that
hung up, failed), what it did not use is given back. The charge is taken before the first token
exists, so it never depends on the client reading its stream; a request whose end is never seen
keeps its whole reservation charged.

The buckets live in the registry's Redis when there is one (every server process shares them,
atomically); in this process otherwise, and, while Redis is unreachable, in this process too (a
reservation is given back where it was taken).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from prefix_registry.errors import RegistryUnavailableError
from prefix_registry.redis_store import RedisStore
from prefix_registry.store import PrefixStore
from prefix_registry.token_buckets import LocalTokenBuckets, Taken, TokenBuckets
from server.errors import RateLimitedError

log = logging.getLogger("prefix_serve.quotas")


@dataclass(frozen=True)
class Reservation:
    """Tokens one request took from its tenant's bucket at admission."""

    tenant: str
    per_minute: int
    tokens: int
    buckets: TokenBuckets  # where they were taken (and go back)


class TokenRateLimiter:
    def __init__(self, shared: TokenBuckets | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.local = LocalTokenBuckets(clock)
        self._shared = shared

    async def reserve(self, tenant: str, per_minute: int | None, tokens: int
                      ) -> Reservation | None:
        """Take `tokens` from `tenant`'s bucket, or raise RateLimitedError; None: no limit."""
        if per_minute is None:
            return None
        buckets, taken = await self._take(tenant, per_minute, tokens)
        if not taken.granted:
            wait_s = taken.wait_s(tokens, per_minute)
            raise RateLimitedError(
                f"tenant {tenant!r} used its {per_minute} tokens per minute (this request "
                f"reserves {tokens}: prompt + max new tokens); retry in "
                f"{max(1, math.ceil(wait_s))} s", retry_after=wait_s,
            )
        return Reservation(tenant, per_minute, tokens, buckets)

    async def settle(self, reservation: Reservation, used: int) -> None:
        """The request ended having used `used` tokens: give back the rest of its reservation."""
        unused = reservation.tokens - used
        if unused == 0:
            return
        try:
            await reservation.buckets.give(reservation.tenant, reservation.per_minute, unused)
        except RegistryUnavailableError as exc:  # the tenant is overcharged, never undercharged
            log.warning("could not return %d unused tokens of tenant %r: %s", unused,
                        reservation.tenant, exc)

    async def _take(self, tenant: str, per_minute: int, tokens: int
                    ) -> tuple[TokenBuckets, Taken]:
        if self._shared is not None:
            try:
                return self._shared, await self._shared.take(tenant, per_minute, tokens)
            except RegistryUnavailableError:
                pass  # generation goes on without the registry; this process counts meanwhile
        return self.local, await self.local.take(tenant, per_minute, tokens)


def rate_limiter_for(store: PrefixStore) -> TokenRateLimiter:
    """Shared buckets when `store` is the Redis registry, this process's otherwise."""
    return TokenRateLimiter(store.token_buckets() if isinstance(store, RedisStore) else None)
