"""The real Redis the tests use, and per-run namespaces on it that the tests remove after."""

from __future__ import annotations

import uuid

import redis

REDIS_URL = "redis://127.0.0.1:6379/0"
RUN_NAMESPACE = f"prefix-serve-test-{uuid.uuid4().hex[:8]}:"  # every test key lives under it


def new_namespace() -> str:
    return f"{RUN_NAMESPACE}{uuid.uuid4().hex[:8]}:"


def delete_namespace(namespace: str, url: str = REDIS_URL) -> None:
    """Remove every key under `namespace` (and nothing else)."""
    client = redis.Redis.from_url(url, socket_timeout=2)
    try:
        keys = list(client.scan_iter(match=f"{namespace}*", count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i : i + 500])
    finally:
        client.close()


def redis_error() -> str | None:
    """Why the test Redis does not answer, or None when it does."""
    try:
        redis.Redis.from_url(REDIS_URL, socket_timeout=1, socket_connect_timeout=1).ping()
    except redis.RedisError as e:
        return str(e)
    return None
