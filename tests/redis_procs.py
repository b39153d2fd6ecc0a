"""Private Redis topologies made of real `redis-server` processes on free loopback ports.

`sentinel_group()` starts a primary, two replicas and three sentinels (quorum 2);
`redis_cluster()` starts three primaries with two replicas each. Both stop every process they
started. Tests skip when `redis-server` / `redis-cli` are not installed (`.ci/run` installs them).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import redis

SERVICE = "prefix-serve-test"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    while True:
        port = free_port()
        if port > 55535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


def missing_binaries() -> str | None:
    """Why these topologies can't run here, or None."""
    for binary in ("redis-server", "redis-cli"):
        if shutil.which(binary) is None:
            return f"{binary} is not installed"
    return None


@dataclass
class Node:
    port: int
    process: subprocess.Popen[bytes]

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2, socket_connect_timeout=1)

    def kill(self) -> None:
        """kill -9: no shutdown, no last replication."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)


@dataclass
class Topology:
    nodes: list[Node] = field(default_factory=list)  # data nodes
    sentinels: list[Node] = field(default_factory=list)

    @property
    def sentinel_url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}"

    @property
    def cluster_url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def node(self, port: int) -> Node:
        return next(n for n in self.nodes if n.port == port)


def _start(stack: ExitStack, directory: Path, args: list[str], port: int) -> Node:
    directory.mkdir(parents=True, exist_ok=True)
    log = open(directory / "redis.log", "wb")  # noqa: SIM115 (closed by the stack)
    stack.callback(log.close)
    process = subprocess.Popen(["redis-server", *args], cwd=directory, stdout=log, stderr=log)
    node = Node(port, process)
    stack.callback(_stop, node)
    _wait(lambda: _pings(node), f"redis-server on port {port} did not start ({directory})")
    return node


def _stop(node: Node) -> None:
    if node.process.poll() is None:
        node.process.terminate()
        try:
            node.process.wait(10)
        except subprocess.TimeoutExpired:
            node.kill()


def _pings(node: Node) -> bool:
    try:
        return bool(node.client().ping())
    except redis.RedisError:
        return False


def _wait(predicate: object, message: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise RuntimeError(message)
        time.sleep(0.1)


def _data_args(port: int) -> list[str]:
    return ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--protected-mode", "no", "--repl-diskless-sync-delay", "0"]


def _replicas_online(node: Node, count: int) -> bool:
    """Whether `node` is a primary with `count` replicas done with their initial sync."""
    try:
        info = node.client().info("replication")
    except redis.RedisError:
        return False
    states = [v.get("state") for v in info.values() if isinstance(v, dict)]
    return info.get("role") == "master" and states.count("online") >= count


@contextmanager
def sentinel_group(root: Path) -> Iterator[Topology]:
    """A primary, two replicas and three sentinels that fail over after 1 s without the primary."""
    with ExitStack() as stack:
        topo = Topology()
        primary_port = free_port()
        topo.nodes.append(_start(stack, root / "primary", _data_args(primary_port), primary_port))
        for i in range(2):
            port = free_port()
            args = [*_data_args(port), "--replicaof", "127.0.0.1", str(primary_port)]
            topo.nodes.append(_start(stack, root / f"replica{i}", args, port))
        for i in range(3):
            port = free_port()
            conf = root / f"sentinel{i}" / "sentinel.conf"
            conf.parent.mkdir(parents=True)
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\nprotected-mode no\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {primary_port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                f"sentinel failover-timeout {SERVICE} 5000\n"
            )
            topo.sentinels.append(_start(stack, conf.parent, [str(conf), "--sentinel"], port))
        _wait(lambda: _replicas_online(topo.nodes[0], 2), "the replicas did not sync")
        _wait(lambda: _sentinels_see_replicas(topo, 2), "sentinels did not discover the replicas")
        yield topo


def _sentinels_see_replicas(topo: Topology, count: int) -> bool:
    try:
        return all(len(s.client().sentinel_slaves(SERVICE)) >= count for s in topo.sentinels)
    except redis.RedisError:
        return False


def sentinel_primary(topo: Topology) -> int:
    """The port the sentinels name as the primary now."""
    _host, port = topo.sentinels[0].client().sentinel_get_master_addr_by_name(SERVICE)
    return int(port)


@contextmanager
def redis_cluster(root: Path, primaries: int = 3, replicas: int = 2) -> Iterator[Topology]:
    """A Redis Cluster whose replicas take over 1 s after their primary stops answering."""
    with ExitStack() as stack:
        topo = Topology()
        for i in range(primaries * (1 + replicas)):
            port = free_cluster_port()
            args = [*_data_args(port), "--cluster-enabled", "yes", "--cluster-node-timeout",
                    "1000", "--cluster-config-file", f"nodes-{port}.conf"]
            topo.nodes.append(_start(stack, root / f"node{i}", args, port))
        addresses = [f"127.0.0.1:{n.port}" for n in topo.nodes]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas",
             str(replicas), "--cluster-yes"], check=True, capture_output=True, timeout=60,
        )
        _wait(lambda: all(_cluster_ok(n) for n in topo.nodes), "the cluster did not form")
        _wait(lambda: sum(_replicas_online(n, replicas) for n in topo.nodes) == primaries,
              "the cluster's replicas did not sync")
        yield topo


def _cluster_ok(node: Node) -> bool:
    try:
        info = node.client().execute_command("CLUSTER", "INFO")
    except redis.RedisError:
        return False
    text = info.decode() if isinstance(info, bytes) else str(info)
    return "cluster_state:ok" in text


def cluster_primary_of(topo: Topology, key: str) -> int:
    """The port of the primary that holds `key`'s slot now."""
    client = redis.RedisCluster(host="127.0.0.1", port=topo.nodes[0].port, socket_timeout=2)
    try:
        return int(client.get_node_from_key(key).port)
    finally:
        client.close()
