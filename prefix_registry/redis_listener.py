"""The pub/sub listener: turns change messages from any process into in-process callbacks.

It runs as one background task per RedisStore on its own connection (no automatic retries in
redis-py, so every disconnect surfaces here). After any disconnect it resubscribes by itself and
calls the subscribers' `on_reset`, since messages published meanwhile are lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from redis.exceptions import RedisError

from prefix_registry.redis_connect import Client, refresh_topology
from prefix_registry.store import Notifier

log = logging.getLogger(__name__)

POLL_S = 1.0  # get_message wait; also how often a closed listener notices
BACKOFF_S = (0.1, 0.25, 0.5, 1.0)  # reconnect delays; the last repeats


class Listener:
    def __init__(self, client: Client, channel: str, notifier: Notifier) -> None:
        self._client = client  # a dedicated client whose connections never retry on their own
        self._channel = channel
        self._notifier = notifier
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()  # set while subscribed
        self._subscribed = False  # whether the current attempt got subscribed

    @property
    def connected(self) -> bool:
        return self._ready.is_set()

    async def start(self, wait_s: float = 2.0) -> None:
        """Start (once) and wait up to `wait_s` until subscribed; if Redis is down, it keeps
        trying in the background."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="prefix-registry-listener")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), wait_s)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._client.aclose()

    async def _run(self) -> None:
        first, streak = True, 0  # streak: failed attempts since the last successful subscribe
        while True:
            self._subscribed = False
            try:
                await self._listen(reset=not first)
            except (RedisError, OSError) as e:
                log.warning("registry change listener disconnected (%s); reconnecting", e)
            except Exception:  # never let a bug end invalidation for this process
                log.exception("registry change listener failed; restarting it")
            first = False
            streak = 1 if self._subscribed else streak + 1
            await asyncio.sleep(BACKOFF_S[min(streak, len(BACKOFF_S)) - 1])

    async def _listen(self, reset: bool) -> None:
        await refresh_topology(self._client)
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self._channel)
            self._subscribed = True
            self._ready.set()
            if reset:  # whatever was published while we were away is lost
                await self._notifier.reset()
            while True:
                message = await pubsub.get_message(timeout=POLL_S)
                if message is not None:
                    await self._dispatch(message.get("data"))
        finally:
            self._ready.clear()
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()

    async def _dispatch(self, data: object) -> None:
        """{"tenant", "name"}: a prefix changed; {"tenant", "revoked": [hash, ...]}: keys that
        stopped working; {"tenant", "quota": true}: the tenant's quota changed."""
        try:
            change = json.loads(data)  # type: ignore[arg-type]  # bytes from Redis; else refused
            tenant = str(change["tenant"])
            revoked = [str(h) for h in change.get("revoked") or ()]
            name = None if change.get("name") is None else str(change["name"])
            quota = change.get("quota") is True
        except (TypeError, ValueError, KeyError, AttributeError):
            log.warning("ignoring a malformed registry change message: %r", data)
            return
        if revoked:
            await self._notifier.revoked(revoked)
        if name is not None:
            await self._notifier.changed(tenant, name)
        if quota:
            await self._notifier.quota_changed(tenant)
