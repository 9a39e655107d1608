"""Prometheus metrics of a client's fail-open spool, for the executor's own /metrics (the
extra `quota-client[metrics]`): how many calls allowed open wait to be counted, how long the
oldest has waited, and how many the sidecar refused for good.

    from prometheus_client import REGISTRY
    from quota_client.metrics import SpoolCollector
    REGISTRY.register(SpoolCollector(quota.spool_status))
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from quota_client._spool import SpoolStatus


class SpoolCollector(Collector):
    """Reads `status()` (a client's spool_status) at scrape time; nothing without a spool."""

    def __init__(self, status: Callable[[], SpoolStatus | None]) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        status = self._status()
        if status is None:
            return
        yield GaugeMetricFamily(
            "quota_client_spool_pending",
            "Calls allowed while the sidecar could not be reached, waiting to be counted",
            value=status.pending,
        )
        yield GaugeMetricFamily(
            "quota_client_spool_oldest_seconds",
            "How long the oldest spooled call has waited to be counted",
            value=status.stuck_for(),
        )
        yield CounterMetricFamily(
            "quota_client_spool_rejected",
            "Spooled calls the sidecar refused for good (never counted; logged)",
            value=status.rejected,
        )
