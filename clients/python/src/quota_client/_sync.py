"""The blocking client."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Self, TypeVar

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


class QuotaClient:
    """Typed blocking client for quota.v1.QuotaService.

    Every call has a deadline (`timeout`, default `default_timeout`), is retried on
    UNAVAILABLE with the same request_id (so a retry is never counted twice), and, when
    the sidecar stays unreachable, follows the call's `failure_mode`.

    With `spool_path`, usage allowed by `FailureMode.OPEN` is appended to that local,
    fsync'd spool before the call returns, and a background thread reports it with
    ReportUsage once the sidecar answers — exactly once, also after this process was
    killed and a new client opened the same spool (`pending_spooled()` tells how many
    wait).
    """

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
            grpc.secure_channel(target, credentials)
            if credentials
            else grpc.insecure_channel(target)
        )
        self._stub = pb_grpc.QuotaServiceStub(self._channel)
        self._metadata = metadata(token)
        self._timeout = default_timeout
        self._retries = retries
        self._backoff = backoff
        self._drainer: Drainer | None = None
        if spool_path is not None:
            self._drainer = Drainer(Spool(spool_path), self._report_once, interval=drain_interval)
            self._drainer.start()

    def _report_once(self, request: pb.ReportUsageRequest, timeout: float) -> None:
        self._stub.ReportUsage(request, timeout=timeout, metadata=self._metadata)

    def _spool(self, usage: SpooledUsage) -> bool:
        if self._drainer is None:
            return False
        self._drainer.spool.append(usage)
        self._drainer.wake()
        return True

    def pending_spooled(self) -> int:
        """How many calls allowed open wait to be reported (0 without a spool)."""
        return 0 if self._drainer is None else len(self._drainer.spool.pending())

    def spool_status(self) -> SpoolStatus | None:
        return None if self._drainer is None else self._drainer.spool.status()

    def drain_spool(self, timeout: float = 2.0) -> int:
        """Report the spool now, in this thread; how many still wait."""
        return 0 if self._drainer is None else self._drainer.once(timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._drainer is not None:
            self._drainer.stop()
        self._channel.close()

    def _call(self, fn: Callable[..., R], request: object, timeout: float | None) -> R:
        for attempt in range(self._retries + 1):
            try:
                return fn(request, timeout=timeout or self._timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                code = exc.code() if isinstance(exc, grpc.Call) else None
                if code not in RETRYABLE or attempt == self._retries:
                    if code in RETRYABLE:
                        raise QuotaUnavailable(str(exc)) from exc
                    raise
                time.sleep(self._backoff * 2**attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def check_and_consume(
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
            return self._call(self._stub.CheckAndConsume, request, timeout)
        except QuotaUnavailable:
            if failure_mode is FailureMode.RAISE:
                raise
            spooled = failure_mode is FailureMode.OPEN and not dry_run
            return unreachable_consume(
                failure_mode, spooled=spooled and self._spool(SpooledUsage.of(request))
            )

    def reserve(
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
    ) -> Reservation:
        """Reserve `amount`; use as `with client.reserve(...) as r: ...; r.commit(actual)`."""
        request = reserve_request(
            tenant_id, resource, amount, request_id, ttl_seconds, tokens, labels
        )
        try:
            response = self._call(self._stub.Reserve, request, timeout)
        except QuotaUnavailable:
            if failure_mode is FailureMode.RAISE:
                raise
            response = unreachable_reserve(failure_mode)
            if response.allowed and self._drainer is not None:
                return Reservation(self, tenant_id, response, fell_open=request)
        return Reservation(self, tenant_id, response)

    def commit(
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
        return self._call(self._stub.Commit, request, timeout)

    def release(
        self, tenant_id: str, reservation_id: str, *, timeout: float | None = None
    ) -> pb.ReleaseResponse:
        request = pb.ReleaseRequest(tenant_id=tenant_id, reservation_id=reservation_id)
        return self._call(self._stub.Release, request, timeout)

    def free(
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
        return self._call(self._stub.Free, request, timeout)

    def get_usage(
        self, tenant_id: str, resource: str | None = None, *, timeout: float | None = None
    ) -> pb.GetUsageResponse:
        request = pb.GetUsageRequest(tenant_id=tenant_id, resource=resource)
        return self._call(self._stub.GetUsage, request, timeout)


class Reservation:
    """A reservation as a context manager: released on exit unless committed."""

    def __init__(
        self,
        client: QuotaClient,
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

    def commit(
        self,
        amount: int,
        *,
        tokens: Tokens | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> pb.CommitResponse:
        if self._fell_open is not None:
            usage = SpooledUsage.of(self._fell_open, amount)
            self._client._spool(usage)
            self.committed = pb.CommitResponse()
            return self.committed
        if not self.reservation_id:
            raise RuntimeError(
                f"nothing to commit: the reservation was denied ({self.response.message})"
            )
        self.committed = self._client.commit(
            self.tenant_id, self.reservation_id, amount, tokens=tokens, labels=labels
        )
        return self.committed

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.committed is None and self.reservation_id:
            self._client.release(self.tenant_id, self.reservation_id)
