"""The sidecar's Prometheus metrics: decisions, latency, batch sizes and sweeps counted on
the way; the engine's and the coalescer's own counts read at scrape time."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from billing_core.db.unit_of_work import Database
from billing_core.quota.engine import QuotaEngine
from quota_service.coalescer import Coalescer


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.decisions = Counter(
            "quota_decisions",
            "CheckAndConsume and Reserve decisions by reason and resource",
            ["method", "reason", "resource"],
            registry=registry,
        )
        self.latency = Histogram(
            "quota_rpc_duration_seconds",
            "Server-side latency of quota RPCs",
            ["method", "code"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
            registry=registry,
        )
        self.batch_size = Histogram(
            "quota_coalesced_batch_size",
            "Requests decided together in one transaction by the coalescer",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=registry,
        )
        self.swept = Counter(
            "quota_swept",
            "Rows the background sweep cleared: expired reservations released, grants past"
            " their expiry expired, expired idempotency keys deleted",
            ["kind"],
            registry=registry,
        )
        # labelled children, looked up once per label set rather than on every call
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Counter | Histogram, *labels: str) -> Any:
        key = (metric, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def decided(self, method: str, reason: str, resource: str) -> None:
        self._child(self.decisions, method, reason, resource).inc()

    def timed(self, method: str, code: str, seconds: float) -> None:
        self._child(self.latency, method, code).observe(seconds)


class EngineCollector(Collector):
    """Counts kept by the engine and the coalescer, read at scrape time (nothing added to
    the request path)."""

    def __init__(self, engine: QuotaEngine, coalescer: Coalescer | None = None) -> None:
        self._engine = engine
        self._coalescer = coalescer

    def collect(self) -> Iterator[Metric]:
        fallbacks = CounterMetricFamily(
            "quota_batch_fallbacks",
            "Coalesced batches decided again one request per transaction: a request_id"
            " taken meanwhile (race), a row lock held elsewhere past the batch's lock timeout"
            " (locked), the database refused the batch (refused), a bug (failed)",
            labels=["reason"],
        )
        for reason, count in self._engine.stats.fallbacks.items():
            fallbacks.add_metric([reason], count)
        yield fallbacks
        yield CounterMetricFamily(
            "quota_db_connections_lost",
            "Transactions run again on another connection because theirs had died"
            " (a terminated backend, a restart, a proxy's timeout)",
            value=self._engine.connections_lost,
        )
        if self._coalescer is not None:
            yield CounterMetricFamily(
                "quota_batch_stalled",
                "Coalesced batches that ran past QUOTA_COALESCE_STALL_MS, waiting on a row lock"
                " held elsewhere; their lane went on without them",
                value=self._coalescer.overtaken,
            )


class PoolCollector(Collector):
    """The database pools at scrape time: connections in use and idle, callers waiting."""

    def __init__(self, database: Database) -> None:
        self._database = database

    def collect(self) -> Iterator[Metric]:
        connections = GaugeMetricFamily(
            "quota_db_pool_connections",
            "Connections of the sidecar's pools (shared, batch) by state (in_use, idle)",
            labels=["pool", "state"],
        )
        waiting = GaugeMetricFamily(
            "quota_db_pool_waiting", "Callers waiting for a connection", labels=["pool"]
        )
        pools = [("shared", self._database.pool), ("batch", self._database.batch_pool)]
        for name, pool in pools:
            if pool is None:
                continue
            stats = pool.get_stats()
            idle = stats.get("pool_available", 0)
            connections.add_metric([name, "in_use"], stats.get("pool_size", 0) - idle)
            connections.add_metric([name, "idle"], idle)
            waiting.add_metric([name], stats.get("requests_waiting", 0))
        yield connections
        yield waiting
