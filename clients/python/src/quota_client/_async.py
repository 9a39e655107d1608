"""The asyncio client: the same calls as QuotaClient, awaited."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc
from quota.v1 import quota_service_pb2 as pb
from quota.v1 import quota_service_pb2_grpc as pb_grpc

from quota_client._messages import (
    RETRYABLE,
    FailureMode,
    QuotaUnavailable,
    Tokens,
    commit_request,
    consume_request,
    metadata,
    new_request_id,
    reserve_request,
    unreachable_consume,
    unreachable_reserve,
)
from quota_client._spool import Drainer, Spool, SpooledUsage, SpoolStatus

R = TypeVar("R")


class AsyncQuotaClient:
    """Typed asyncio client for quota.v1.QuotaService (see QuotaClient for the rules,
    `spool_path` included: the spool is drained by a thread with a channel of its own)."""

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        default_timeout: float = 2.0,
        retries: int = 3,
        backoff: float = 0.05,
        spool_path: str | None = None,
        drain_interval: float = 1.0,
    ) -> None:
        self._channel = (
            grpc.aio.secure_channel(target, credentials)
            if credentials
            else grpc.aio.insecure_channel(target)
        )
        self._drainer: Drainer | None = None
        self._drain_channel: grpc.Channel | None = None
        if spool_path is not None:
            self._drain_channel = (
                grpc.secure_channel(target, credentials)
                if credentials
                else grpc.insecure_channel(target)
            )
            reporter = pb_grpc.QuotaServiceStub(self._drain_channel).ReportUsage
            sent = metadata(token)

            def report(request: pb.ReportUsageRequest, timeout: float) -> None:
                reporter(request, timeout=timeout, metadata=sent)

            self._drainer = Drainer(Spool(spool_path), report, interval=drain_interval)
            self._drainer.start()
        self._stub = pb_grpc.QuotaServiceStub(self._channel)
        self._metadata = metadata(token)
        self._timeout = default_timeout
        self._retries = retries
        self._backoff = backoff

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._drainer is not None:
            await asyncio.to_thread(self._drainer.stop)
        if self._drain_channel is not None:
            self._drain_channel.close()
        await self._channel.close(None)

    async def _spool(self, usage: SpooledUsage) -> bool:
        if self._drainer is None:
            return False
        await asyncio.to_thread(self._drainer.spool.append, usage)
        self._drainer.wake()
        return True

    async def pending_spooled(self) -> int:
        """How many calls allowed open wait to be reported (0 without a spool)."""
        if self._drainer is None:
            return 0
        return len(await asyncio.to_thread(self._drainer.spool.pending))

    async def spool_status(self) -> SpoolStatus | None:
        if self._drainer is None:
            return None
        return await asyncio.to_thread(self._drainer.spool.status)

    async def drain_spool(self, timeout: float = 2.0) -> int:
        """Report the spool now; how many still wait."""
        if self._drainer is None:
            return 0
        return await asyncio.to_thread(self._drainer.once, timeout)

    async def _call(
        self, fn: Callable[..., Awaitable[R]], request: object, timeout: float | None
    ) -> R:
        for attempt in range(self._retries + 1):
            try:
                return await fn(request, timeout=timeout or self._timeout, metadata=self._metadata)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRYABLE or attempt == self._retries:
                    if exc.code() in RETRYABLE:
                        raise QuotaUnavailable(str(exc)) from exc
                    raise
                await asyncio.sleep(self._backoff * 2**attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    async def check_and_consume(
        self,
        tenant_id: str,
        resource: str,
        amount: int,
        *,
        request_id: str | None = None,
        dry_run: bool = False,
        tokens: Tokens | None = None,
        labels: Mapping[str, str] | None = None,
        timeout: float | None = None,
        failure_mode: FailureMode = FailureMode.RAISE,
    ) -> pb.CheckAndConsumeResponse:
        request = consume_request(tenant_id, resource, amount, request_id, dry_run, tokens, labels)
        try:
            return await self._call(self._stub.CheckAndConsume, request, timeout)
        except QuotaUnavailable:
            if failure_mode is FailureMode.RAISE:
                raise
            spooled = failure_mode is FailureMode.OPEN and not dry_run
            return unreachable_consume(
                failure_mode, spooled=spooled and await self._spool(SpooledUsage.of(request))
            )

    async def reserve(
        self,
        tenant_id: str,
        resource: str,
        amount: int,
        *,
        request_id: str | None = None,
        ttl_seconds: int = 300,
        tokens: Tokens | None = None,
        labels: Mapping[str, str] | None = None,
        timeout: float | None = None,
        failure_mode: FailureMode = FailureMode.RAISE,
    ) -> AsyncReservation:
        """`async with await client.reserve(...) as r: ...; await r.commit(actual)`."""
        request = reserve_request(
            tenant_id, resource, amount, request_id, ttl_seconds, tokens, labels
        )
        try:
            response = await self._call(self._stub.Reserve, request, timeout)
        except QuotaUnavailable:
            if failure_mode is FailureMode.RAISE:
                raise
            response = unreachable_reserve(failure_mode)
            if response.allowed and self._drainer is not None:
                return AsyncReservation(self, tenant_id, response, fell_open=request)
        return AsyncReservation(self, tenant_id, response)

    async def commit(
        self,
        tenant_id: str,
        reservation_id: str,
        amount: int,
        *,
        tokens: Tokens | None = None,
        labels: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> pb.CommitResponse:
        request = commit_request(tenant_id, reservation_id, amount, tokens, labels)
        return await self._call(self._stub.Commit, request, timeout)

    async def release(
        self, tenant_id: str, reservation_id: str, *, timeout: float | None = None
    ) -> pb.ReleaseResponse:
        request = pb.ReleaseRequest(tenant_id=tenant_id, reservation_id=reservation_id)
        return await self._call(self._stub.Release, request, timeout)

    async def free(
        self,
        tenant_id: str,
        resource: str,
        amount: int,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> pb.FreeResponse:
        request = pb.FreeRequest(
            tenant_id=tenant_id,
            resource=resource,
            amount=amount,
            request_id=request_id or new_request_id(),
        )
        return await self._call(self._stub.Free, request, timeout)

    async def get_usage(
        self, tenant_id: str, resource: str | None = None, *, timeout: float | None = None
    ) -> pb.GetUsageResponse:
        request = pb.GetUsageRequest(tenant_id=tenant_id, resource=resource)
        return await self._call(self._stub.GetUsage, request, timeout)


class AsyncReservation:
    """A reservation as an async context manager: released on exit unless committed."""

    def __init__(
        self,
        client: AsyncQuotaClient,
        tenant_id: str,
        response: pb.ReserveResponse,
        *,
        fell_open: pb.ReserveRequest | None = None,
    ) -> None:
        self._client = client
        self.tenant_id = tenant_id
        self.response = response
        self.committed: pb.CommitResponse | None = None
        # allowed open with a spool: its Commit spools the amount used
        self._fell_open = fell_open

    @property
    def allowed(self) -> bool:
        return self.response.allowed

    @property
    def reservation_id(self) -> str:
        return self.response.reservation_id

    async def commit(self, amount: int, **kwargs: Any) -> pb.CommitResponse:
        if self._fell_open is not None:
            await self._client._spool(SpooledUsage.of(self._fell_open, amount))
            self.committed = pb.CommitResponse()
            return self.committed
        if not self.reservation_id:
            raise RuntimeError(
                f"nothing to commit: the reservation was denied ({self.response.message})"
            )
        self.committed = await self._client.commit(
            self.tenant_id, self.reservation_id, amount, **kwargs
        )
        return self.committed

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.committed is None and self.reservation_id:
            await self._client.release(self.tenant_id, self.reservation_id)
