"""quota.v1.QuotaService: parse the request, call the engine, build the response."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import structlog
from google.protobuf.message import DecodeError, Message
from quota.v1 import quota_service_pb2 as pb
from quota.v1 import quota_service_pb2_grpc as pb_grpc

from billing_core.errors import QuotaError
from billing_core.quota.engine import QuotaEngine
from quota_service import convert
from quota_service.coalescer import Coalescer
from quota_service.errors import details_for, status_for
from quota_service.metrics import Metrics

log = structlog.get_logger(__name__)
Resp = TypeVar("Resp")


class QuotaServicer(pb_grpc.QuotaServiceServicer):
    def __init__(
        self, engine: QuotaEngine, metrics: Metrics, coalescer: Coalescer | None = None
    ) -> None:
        self._engine = engine
        # CheckAndConsume, Reserve, Commit, Release and Free: with their lane's batch, or
        # each in a transaction of its own
        self._admit = coalescer.admit if coalescer is not None else engine.consume
        self._commit = coalescer.commit if coalescer is not None else engine.commit
        self._release = coalescer.release if coalescer is not None else engine.release
        self._free = coalescer.free if coalescer is not None else engine.free
        self._metrics = metrics

    async def _call(
        self,
        method: str,
        context: grpc.aio.ServicerContext[object, object],
        work: Callable[[], Awaitable[Resp]],
    ) -> Resp:
        return await timed_call(self._metrics, method, context, work)

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
            return convert.free_response(await self._free(convert.free_request(request)))

        return await self._call("Free", context, work)  # type: ignore[arg-type]

    async def GetUsage(
        self,
        request: pb.GetUsageRequest,
        context: grpc.aio.ServicerContext[pb.GetUsageRequest, pb.GetUsageResponse],
    ) -> pb.GetUsageResponse:
        async def work() -> pb.GetUsageResponse:
            return convert.usage_response(await self._engine.usage(convert.usage_request(request)))

        return await self._call("GetUsage", context, work)  # type: ignore[arg-type]

    async def ReportUsage(
        self,
        request: pb.ReportUsageRequest,
        context: grpc.aio.ServicerContext[pb.ReportUsageRequest, pb.ReportUsageResponse],
    ) -> pb.ReportUsageResponse:
        async def work() -> pb.ReportUsageResponse:
            reported = await self._engine.report(convert.report_request(request))
            self._metrics.decided("ReportUsage", "fail_open", request.resource)
            return convert.report_response(reported)

        return await self._call("ReportUsage", context, work)  # type: ignore[arg-type]


async def timed_call(
    metrics: Metrics,
    method: str,
    context: grpc.aio.ServicerContext[Any, Any],
    work: Callable[[], Awaitable[Resp]],
) -> Resp:
    """Run one RPC's work: its duration in the metrics by status, a QuotaError answered with
    its status (the one mapping), UNAVAILABLE logged."""
    started = time.perf_counter()
    code = "OK"
    try:
        return await work()
    except QuotaError as exc:
        status = status_for(exc)
        code = status.name
        if status is grpc.StatusCode.UNAVAILABLE:
            log.warning("quota_call_unavailable", method=method, error=exc.message)
        await context.abort(status, details_for(exc))
        raise  # pragma: no cover - abort raises
    finally:
        metrics.timed(method, code, time.perf_counter() - started)


class _Unreadable:
    """A request whose bytes are no message of its type."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _reader(message: type[Message]) -> Callable[[bytes], Message | _Unreadable]:
    def read(raw: bytes) -> Message | _Unreadable:
        try:
            return message.FromString(raw)
        except DecodeError as exc:
            return _Unreadable(exc)

    return read


def add_to_server(servicer: QuotaServicer, server: grpc.aio.Server) -> None:
    """Register the service like the generated code does (see rpc_handler)."""
    service = pb.DESCRIPTOR.services_by_name["QuotaService"]
    handlers = {
        method.name: rpc_handler(
            getattr(servicer, method.name),
            getattr(pb, method.input_type.name),
            getattr(pb, method.output_type.name),
        )
        for method in service.methods
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )


def rpc_handler(
    handler: Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]],
    request_type: type[Message],
    response_type: type[Message],
) -> grpc.RpcMethodHandler[Any, Any]:
    """A unary handler as generated code makes it, but bytes that are no `request_type`
    answer INVALID_ARGUMENT (gRPC answers a failed deserializer with UNKNOWN)."""
    return grpc.unary_unary_rpc_method_handler(
        _checked(handler, request_type.__name__),
        request_deserializer=_reader(request_type),
        response_serializer=response_type.SerializeToString,
    )


def _checked(
    handler: Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]], name: str
) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]:
    async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if isinstance(request, _Unreadable):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a {name}: {request.error}"
            )
        return await handler(request, context)

    return call
