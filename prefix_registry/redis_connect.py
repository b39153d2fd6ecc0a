"""Connecting to Redis from one URL: a single server, a Sentinel-managed primary, or a Cluster.

```
redis://[[user]:password@]host:port[/db]     one server (also rediss://, unix://: redis-py's forms)
redis+sentinel://[[user]:password@]host:port[,host:port...]/service[/db][?sentinel_password=...]
redis+cluster://[[user]:password@]host:port[,host:port...]
```
Both HA forms also take `?write_replicas=N`: the replicas that must confirm each write (default 1).

With Sentinel the client asks the sentinels for the service's primary and asks again after a
failover; with Cluster it follows the slot map. Either way a failover surfaces to callers as
`RegistryUnavailableError` for the few seconds it takes, then calls succeed again by themselves.
Every topology honours the same pool bound: at most `max_connections` connections, and a caller
that finds them all busy waits up to `pool_timeout_s` for one instead of failing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import BlockingConnectionPool
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from prefix_registry.errors import RegistryUnavailableError

SENTINEL_SCHEME = "redis+sentinel"
CLUSTER_SCHEME = "redis+cluster"
SINGLE_SCHEMES = ("redis", "rediss", "unix")  # redis-py's own
ALL_SCHEMES = tuple(f"{s}://" for s in (*SINGLE_SCHEMES, SENTINEL_SCHEME, CLUSTER_SCHEME))
DEFAULT_SENTINEL_PORT = 26379
DEFAULT_REDIS_PORT = 6379

Topology = Literal["single", "sentinel", "cluster"]
Client = aioredis.Redis | RedisCluster


@dataclass(frozen=True)
class RedisOptions:
    """Connection behaviour: short timeouts so a dead Redis fails fast instead of hanging."""

    socket_timeout_s: float = 2.0  # a whole reply; large prefixes over slow links need more
    connect_timeout_s: float = 1.0
    retries: int = 1  # per command on a dropped connection, before RegistryUnavailableError
    health_check_interval_s: int = 10  # PING an idle pooled connection before reusing it
    max_connections: int = 100  # the pool's bound (per process; per node with Cluster)
    pool_timeout_s: float = 5.0  # how long a caller waits for a free pooled connection
    # Replicas that must confirm each write (Redis WAIT) before it is acknowledged; None = 1
    # with Sentinel or Cluster (a failover then never loses an acknowledged write), 0 otherwise.
    write_replicas: int | None = None
    write_timeout_s: float = 1.0  # how long a write waits for those confirmations


@dataclass(frozen=True)
class RedisTarget:
    """Where the registry's Redis is, parsed from its URL."""

    topology: Topology
    url: str  # as given (redis-py parses single-server URLs itself)
    nodes: tuple[tuple[str, int], ...] = ()  # sentinels, or cluster seed nodes
    service: str = ""  # the Sentinel service (master) name
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None
    replicas: int | None = None  # ?write_replicas=N

    def write_replicas(self, options: RedisOptions) -> int:
        for explicit in (self.replicas, options.write_replicas):
            if explicit is not None:
                return explicit
        return 0 if self.topology == "single" else 1


def parse_redis_url(url: str) -> RedisTarget:
    """Parse a registry URL; ValueError names what is wrong."""
    scheme = url.partition("://")[0].lower()
    if scheme not in (SENTINEL_SCHEME, CLUSTER_SCHEME):
        if scheme not in SINGLE_SCHEMES:  # else redis-py's own message lists only its three
            raise ValueError(f"a Redis URL starts with one of {', '.join(ALL_SCHEMES)}")
        return RedisTarget("single", url)
    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username, password = _credentials(userinfo)
    default_port = DEFAULT_SENTINEL_PORT if scheme == SENTINEL_SCHEME else DEFAULT_REDIS_PORT
    nodes = tuple(_host_port(h, default_port) for h in hosts.split(",") if h)
    if not nodes:
        raise ValueError(f"{scheme}:// URL names no host")
    path = [p for p in parts.path.split("/") if p]
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    replicas = _replicas(query.get("write_replicas"))
    if scheme == CLUSTER_SCHEME:
        if len(path) > 1 or (path and path[0] != "0"):
            raise ValueError("a Redis Cluster has only database 0")
        return RedisTarget("cluster", url, nodes, username=username, password=password,
                           replicas=replicas)
    if not path:
        raise ValueError("a redis+sentinel:// URL needs the service name: .../mymaster")
    db = int(path[1]) if len(path) > 1 and path[1].isdigit() else 0
    return RedisTarget("sentinel", url, nodes, unquote(path[0]), db, username, password,
                       query.get("sentinel_password"), replicas)


def _replicas(value: str | None) -> int | None:
    if value is None:
        return None
    if not value.isdigit() or int(value) > 16:
        raise ValueError(f"write_replicas must be a number from 0 to 16, not {value!r}")
    return int(value)


def _credentials(userinfo: str) -> tuple[str | None, str | None]:
    if not userinfo:
        return None, None
    user, sep, password = userinfo.partition(":")
    return (unquote(user) or None), (unquote(password) if sep else None)


def _host_port(text: str, default_port: int) -> tuple[str, int]:
    if text.startswith("["):  # [IPv6]:port
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, _, port = text.partition(":")
    try:
        return host, int(port or default_port)
    except ValueError:
        raise ValueError(f"bad host:port {text!r} in the Redis URL") from None


def connect(target: RedisTarget, options: RedisOptions, *, retries: int | None = None) -> Client:
    """A client for `target`; `retries` overrides the options (the listener wants none)."""
    n = options.retries if retries is None else retries
    backoff = ExponentialBackoff(cap=0.5, base=0.05) if n else NoBackoff()
    common: dict[str, Any] = dict(
        socket_timeout=options.socket_timeout_s,
        socket_connect_timeout=options.connect_timeout_s,
        health_check_interval=options.health_check_interval_s,
        # retry a dropped connection (e.g. a stale pooled one after a Redis restart), not a
        # timeout: a hung Redis would otherwise cost (retries + 1)^2 socket timeouts per call
        retry=Retry(backoff, n, supported_errors=(RedisConnectionError,)),
    )
    if target.topology == "cluster":
        return _cluster(target, options, common)
    if target.topology == "sentinel":
        return _sentinel(target, options, common)
    pool = BlockingConnectionPool.from_url(
        target.url, max_connections=options.max_connections, timeout=options.pool_timeout_s,
        **common,
    )
    return aioredis.Redis.from_pool(pool)


class BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """Sentinel's pool (asks the sentinels where the primary is) with the blocking pool's wait
    for a free connection."""


def _sentinel(target: RedisTarget, options: RedisOptions, common: dict[str, Any]) -> Client:
    sentinel_kwargs = {
        "socket_timeout": options.socket_timeout_s,
        "socket_connect_timeout": options.connect_timeout_s,
        "password": target.sentinel_password,
    }
    sentinel = Sentinel(list(target.nodes), sentinel_kwargs=sentinel_kwargs)
    return sentinel.master_for(
        target.service, connection_pool_class=BlockingSentinelPool,
        max_connections=options.max_connections, timeout=options.pool_timeout_s,
        db=target.db, username=target.username, password=target.password, **common,
    )


class BoundedCluster(RedisCluster):
    """redis-py's cluster client fails at once when a node's connections are all busy; this one
    lets at most `max_connections` commands run at a time and makes the others wait up to
    `pool_timeout_s`, like the blocking pool of the other topologies."""

    def __init__(self, *args: Any, pool_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._gate = asyncio.Semaphore(kwargs.get("max_connections", 100))
        self._gate_timeout_s = pool_timeout_s

    @contextlib.asynccontextmanager
    async def permit(self) -> AsyncIterator[None]:
        try:
            await asyncio.wait_for(self._gate.acquire(), self._gate_timeout_s)
        except TimeoutError:
            raise RedisConnectionError("No connection available.") from None
        try:
            yield
        finally:
            self._gate.release()

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self.permit():
            return await super().execute_command(*args, **kwargs)


def _cluster(target: RedisTarget, options: RedisOptions, common: dict[str, Any]) -> Client:
    common.pop("retry")  # the cluster client retries on its own after refreshing the slot map
    return BoundedCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
        username=target.username, password=target.password,
        max_connections=options.max_connections, pool_timeout_s=options.pool_timeout_s,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), max(options.retries, 3),
                    supported_errors=(RedisConnectionError, RedisTimeoutError)),
        **common,
    )


async def refresh_topology(client: Client) -> None:
    """Re-read a cluster's slot map (the listener's pub/sub connection picks its node from it;
    after a failover the old map names a dead node). Nothing to do on the other topologies."""
    if isinstance(client, RedisCluster):
        await client.nodes_manager.initialize()


Command = Sequence[Any]  # e.g. ("EVAL", script, 2, key1, key2, arg1)


async def write(
    client: Client, slot_key: str, commands: Sequence[Command], *, replicas: int,
    timeout_s: float,
) -> list[Any]:
    """Run `commands` (all on `slot_key`'s slot) in order on one connection; with `replicas`,
    follow them on that connection with WAIT, and refuse to acknowledge what fewer replicas
    confirmed (the write may be lost in a failover, so the caller must not count on it)."""
    wait = ("WAIT", replicas, max(1, int(timeout_s * 1000)))  # keep it under the socket timeout
    if isinstance(client, BoundedCluster):
        results = await _cluster_write(client, slot_key, commands, wait if replicas else None)
    else:
        async with client.pipeline(transaction=False) as pipe:
            for command in [*commands, *([wait] if replicas else [])]:
                pipe.execute_command(*command)
            results = await pipe.execute()
    if replicas:
        confirmed = results.pop()
        if confirmed is None or int(confirmed) < replicas:
            raise RegistryUnavailableError(
                f"prefix registry (Redis): the write reached the primary, but {confirmed or 0} "
                f"of {replicas} replicas confirmed it within {timeout_s}s; retry"
            )
    return list(results)


async def _cluster_write(
    client: BoundedCluster, slot_key: str, commands: Sequence[Command], wait: Command | None
) -> list[Any]:
    await client.initialize()  # the slot map, once
    node = client.get_node_from_key(slot_key)
    pipe = client.pipeline()  # not gated: its redirections run through execute_command
    for command in commands:
        pipe.execute_command(*command)
    if wait is not None:  # same node, so the same connection right after the writes
        pipe.execute_command(*wait, target_nodes=node)
    results = await pipe.execute()
    if wait is not None and client.get_node_from_key(slot_key) is not node:
        results[-1] = None  # the slot moved meanwhile: that WAIT proves nothing
    return list(results)
