"""quota.v1.QuotaService: parse the request, call the engine, build the response."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import grpc
import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from quota.v1 import quota_service_pb2 as pb
from quota.v1 import quota_service_pb2_grpc as pb_grpc

from billing_core.errors import QuotaError
from billing_core.quota_engine import QuotaEngine
from quota_service import convert
from quota_service.coalescer import Coalescer
from quota_service.errors import status_for

log = structlog.get_logger(__name__)
Resp = TypeVar("Resp")


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
            "CheckAndConsume, Reserve, Commit and Release requests decided together in one"
            " transaction",
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
        # labelled children, looked up once per metric and label set rather than on every call
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
    """The engine's and the coalescer's own counts, read at scrape time (nothing added to
    the request path): how much of the coalesced traffic left the set-based path (a rising
    count means batches are not doing their job), batches stalled on a lock held elsewhere,
    calls run again after their connection died."""

    def __init__(self, engine: QuotaEngine, coalescer: Coalescer | None = None) -> None:
        self._engine = engine
        self._coalescer = coalescer

    def collect(self) -> Iterator[Metric]:
        alone = CounterMetricFamily(
            "quota_batch_decided_one_by_one",
            "Requests of coalesced batches decided one by one inside the batch's transaction"
            " (tenants with an expired reservation or a due grant, until they are tidied)",
            value=self._engine.decided_alone,
        )
        fallbacks = CounterMetricFamily(
            "quota_batch_fallbacks",
            "Coalesced batches whose requests were all retried one by one: a request_id taken"
            " meanwhile (race), a row lock held elsewhere past the batch's lock timeout"
            " (locked), the database refused the batch (refused), a bug (failed)",
            labels=["reason"],
        )
        for reason, count in self._engine.fallbacks.items():
            fallbacks.add_metric([reason], count)
        yield alone
        yield fallbacks
        yield CounterMetricFamily(
            "quota_db_connections_lost",
            "Calls and batches run again on another connection because theirs had died"
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


class QuotaServicer(pb_grpc.QuotaServiceServicer):
    def __init__(
        self, engine: QuotaEngine, metrics: Metrics, coalescer: Coalescer | None = None
    ) -> None:
        self._engine = engine
        # CheckAndConsume, Reserve, Commit and Release: with their lane's batch, or one by one
        self._admit = coalescer.admit if coalescer is not None else engine.admit
        self._commit = coalescer.commit if coalescer is not None else engine.commit
        self._release = coalescer.release if coalescer is not None else engine.release
        self._metrics = metrics

    async def _call(
        self,
        method: str,
        context: grpc.aio.ServicerContext[object, object],
        work: Callable[[], Awaitable[Resp]],
    ) -> Resp:
        started = time.perf_counter()
        code = "OK"
        try:
            return await work()
        except QuotaError as exc:
            status = status_for(exc)
            code = status.name
            if status is grpc.StatusCode.UNAVAILABLE:
                log.warning("quota_call_unavailable", method=method, error=exc.message)
            await context.abort(status, exc.message)
            raise  # pragma: no cover - abort raises
        finally:
            self._metrics.timed(method, code, time.perf_counter() - started)

    async def CheckAndConsume(
        self,
        request: pb.CheckAndConsumeRequest,
        context: grpc.aio.ServicerContext[pb.CheckAndConsumeRequest, pb.CheckAndConsumeResponse],
    ) -> pb.CheckAndConsumeResponse:
        async def work() -> pb.CheckAndConsumeResponse:
            decision = await self._admit(convert.consume_request(request))
            self._metrics.decided("CheckAndConsume", decision.reason.value, request.resource)
            return convert.consume_response(decision)

        return await self._call("CheckAndConsume", context, work)  # type: ignore[arg-type]

    async def Reserve(
        self,
        request: pb.ReserveRequest,
        context: grpc.aio.ServicerContext[pb.ReserveRequest, pb.ReserveResponse],
    ) -> pb.ReserveResponse:
        async def work() -> pb.ReserveResponse:
            decision = await self._admit(convert.reserve_request(request))
            self._metrics.decided("Reserve", decision.reason.value, request.resource)
            return convert.reserve_response(decision)

        return await self._call("Reserve", context, work)  # type: ignore[arg-type]

    async def Commit(
        self,
        request: pb.CommitRequest,
        context: grpc.aio.ServicerContext[pb.CommitRequest, pb.CommitResponse],
    ) -> pb.CommitResponse:
        async def work() -> pb.CommitResponse:
            return convert.commit_response(await self._commit(convert.commit_request(request)))

        return await self._call("Commit", context, work)  # type: ignore[arg-type]

    async def Release(
        self,
        request: pb.ReleaseRequest,
        context: grpc.aio.ServicerContext[pb.ReleaseRequest, pb.ReleaseResponse],
    ) -> pb.ReleaseResponse:
        async def work() -> pb.ReleaseResponse:
            released = await self._release(convert.release_request(request))
            return pb.ReleaseResponse(released=released)

        return await self._call("Release", context, work)  # type: ignore[arg-type]

    async def Free(
        self,
        request: pb.FreeRequest,
        context: grpc.aio.ServicerContext[pb.FreeRequest, pb.FreeResponse],
    ) -> pb.FreeResponse:
        async def work() -> pb.FreeResponse:
            return convert.free_response(await self._engine.free(convert.free_request(request)))

        return await self._call("Free", context, work)  # type: ignore[arg-type]

    async def GetUsage(
        self,
        request: pb.GetUsageRequest,
        context: grpc.aio.ServicerContext[pb.GetUsageRequest, pb.GetUsageResponse],
    ) -> pb.GetUsageResponse:
        async def work() -> pb.GetUsageResponse:
            return convert.usage_response(await self._engine.usage(convert.usage_request(request)))

        return await self._call("GetUsage", context, work)  # type: ignore[arg-type]
