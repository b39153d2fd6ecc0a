"""Each engine replica's engine counters as Ray metrics, labelled with the replica.

Ray exports them with every node's metrics (`ray_prefix_serve_replica_*{replica="..."}`, plus
Ray's own `ReplicaId`, `deployment` and `application` labels), so Prometheus scraping the Ray
nodes sees every replica, and `sum without (replica)` aggregates them. The ingress's `/metrics`
keeps the HTTP-level series of the ingress replica that answers it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from ray.util.metrics import Gauge

from server.api.metrics import ENGINE_FIELDS, stats_dict
from server.engine.config import EngineStats

REPORT_INTERVAL_S = 1.0


class ReplicaMetrics:
    """Copies `stats()` into gauges every second (totals are exported as gauges of the total)."""

    def __init__(self, replica: str, stats: Callable[[], EngineStats]) -> None:
        self._replica = replica
        self._stats = stats
        self._gauges = {
            field: Gauge(f"prefix_serve_replica_{suffix}", description=doc,
                         tag_keys=("replica",))
            for field, (suffix, doc, _kind) in ENGINE_FIELDS.items()
        }
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            self.report()
            await asyncio.sleep(REPORT_INTERVAL_S)

    def report(self) -> None:
        data = stats_dict(self._stats())
        for field, gauge in self._gauges.items():
            value = data.get(field)
            if isinstance(value, int | float):
                gauge.set(float(value), tags={"replica": self._replica})

    def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(RuntimeError):
            self.report()
