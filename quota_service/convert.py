"""Wire messages ↔ the engine's own types; nothing else lives here."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from functools import lru_cache
from types import MappingProxyType

from google.protobuf.timestamp_pb2 import Timestamp
from quota.v1 import quota_service_pb2 as pb

from billing_core.errors import InvalidRequest
from billing_core.quota.answers import (
    CommitResult,
    Decision,
    FreeResult,
    ReportResult,
    UsageReport,
    WindowView,
)
from billing_core.quota.requests import (
    CommitRequest,
    ConsumeRequest,
    FreeRequest,
    ReleaseRequest,
    ReportRequest,
    ReserveRequest,
    UsageRequest,
)
from billing_core.rules.limits import Reason, WindowState
from billing_core.rules.pricing import TokenUsage
from billing_core.rules.resources import Period

PERIOD_PB: dict[Period, pb.Period.ValueType] = {
    Period.DAILY: pb.PERIOD_DAILY,
    Period.WEEKLY: pb.PERIOD_WEEKLY,
    Period.MONTHLY: pb.PERIOD_MONTHLY,
    Period.OVERALL: pb.PERIOD_OVERALL,
    Period.CUMULATIVE: pb.PERIOD_CUMULATIVE,
}
STATE_PB: dict[WindowState, pb.WindowState.ValueType] = {
    WindowState.OK: pb.WINDOW_STATE_OK,
    WindowState.WARNING: pb.WINDOW_STATE_WARNING,
    WindowState.EXHAUSTED: pb.WINDOW_STATE_EXHAUSTED,
}
REASON_PB: dict[Reason, pb.Reason.ValueType] = {
    Reason.ALLOWED: pb.REASON_ALLOWED,
    Reason.QUOTA_EXCEEDED: pb.REASON_QUOTA_EXCEEDED,
    Reason.INSUFFICIENT_CREDITS: pb.REASON_INSUFFICIENT_CREDITS,
    Reason.NO_ACTIVE_SUBSCRIPTION: pb.REASON_NO_ACTIVE_SUBSCRIPTION,
    Reason.TRIAL_EXPIRED: pb.REASON_TRIAL_EXPIRED,
    Reason.PAYMENT_PAST_DUE: pb.REASON_PAYMENT_PAST_DUE,
    Reason.RESOURCE_NOT_IN_PLAN: pb.REASON_RESOURCE_NOT_IN_PLAN,
}


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NO_LABELS: Mapping[str, str] = MappingProxyType({})
_NO_TIME = datetime(1970, 1, 1)  # naive: what a ReportUsage without occurred_at becomes


@lru_cache(maxsize=4096)  # a window's reset instant recurs in every answer until it passes
def _ts(at: datetime | None) -> Timestamp | None:
    """Exact, like Timestamp.FromDatetime (a naive datetime is UTC), at half its cost."""
    if at is None:
        return None
    since = (at if at.tzinfo is not None else at.replace(tzinfo=UTC)) - _EPOCH
    return Timestamp(seconds=since.days * 86_400 + since.seconds, nanos=since.microseconds * 1000)


def _tokens(msg: pb.TokenUsage) -> TokenUsage:
    return TokenUsage(msg.provider, msg.model, msg.input_tokens, msg.output_tokens)


def _labels(labels: Mapping[str, str]) -> Mapping[str, str]:
    return dict(labels) if labels else _NO_LABELS


def consume_request(msg: pb.CheckAndConsumeRequest) -> ConsumeRequest:
    return ConsumeRequest(
        msg.tenant_id,
        msg.resource,
        msg.amount,
        msg.request_id,
        msg.dry_run,
        _tokens(msg.tokens) if msg.HasField("tokens") else None,
        _labels(msg.labels),
    )


def reserve_request(msg: pb.ReserveRequest) -> ReserveRequest:
    return ReserveRequest(
        tenant_id=msg.tenant_id,
        resource=msg.resource,
        amount=msg.amount,
        request_id=msg.request_id,
        dry_run=msg.dry_run,
        tokens=_tokens(msg.tokens) if msg.HasField("tokens") else None,
        labels=_labels(msg.labels),
        ttl_seconds=msg.ttl_seconds or 300,
    )


def commit_request(msg: pb.CommitRequest) -> CommitRequest:
    return CommitRequest(
        tenant_id=msg.tenant_id,
        reservation_id=msg.reservation_id,
        amount=msg.amount,
        tokens=_tokens(msg.tokens) if msg.HasField("tokens") else None,
        labels=_labels(msg.labels),
    )


def release_request(msg: pb.ReleaseRequest) -> ReleaseRequest:
    return ReleaseRequest(msg.tenant_id, msg.reservation_id)


def free_request(msg: pb.FreeRequest) -> FreeRequest:
    return FreeRequest(msg.tenant_id, msg.resource, msg.amount, msg.request_id)


def report_request(msg: pb.ReportUsageRequest) -> ReportRequest:
    """A missing occurred_at stays missing (naive: refused by validation), never 'now'."""
    at = _NO_TIME
    if msg.HasField("occurred_at"):
        try:
            at = msg.occurred_at.ToDatetime(tzinfo=UTC)
        except (ValueError, OverflowError):
            raise InvalidRequest("occurred_at is not a representable moment") from None
    return ReportRequest(
        tenant_id=msg.tenant_id,
        resource=msg.resource,
        amount=msg.amount,
        request_id=msg.request_id,
        occurred_at=at,
        tokens=_tokens(msg.tokens) if msg.HasField("tokens") else None,
        labels=_labels(msg.labels),
    )


def usage_request(msg: pb.GetUsageRequest) -> UsageRequest:
    return UsageRequest(msg.tenant_id, msg.resource if msg.HasField("resource") else None)


def window(view: WindowView) -> pb.WindowStatus:
    return pb.WindowStatus(
        period=PERIOD_PB[view.period],
        limit=view.limit,
        used=view.used,
        remaining=view.remaining,
        resets_at=_ts(view.resets_at),
        state=STATE_PB[view.state],
        unlimited=view.unlimited,
    )


def consume_response(d: Decision) -> pb.CheckAndConsumeResponse:
    return pb.CheckAndConsumeResponse(
        allowed=d.allowed,
        reason=REASON_PB[d.reason],
        windows=[window(w) for w in d.windows],
        cost_micros=d.cost_micros,
        wallet_balance_micros=d.wallet_balance_micros,
        usage_record_id=d.usage_record_id,
        replayed=d.replayed,
        message=d.message,
        upgrade_plan_id=d.upgrade_plan_id,
    )


def reserve_response(d: Decision) -> pb.ReserveResponse:
    return pb.ReserveResponse(
        allowed=d.allowed,
        reason=REASON_PB[d.reason],
        windows=[window(w) for w in d.windows],
        reservation_id=d.reservation_id,
        expires_at=_ts(d.expires_at),
        replayed=d.replayed,
        message=d.message,
        upgrade_plan_id=d.upgrade_plan_id,
    )


def commit_response(r: CommitResult) -> pb.CommitResponse:
    return pb.CommitResponse(
        usage_record_id=r.usage_record_id,
        cost_micros=r.cost_micros,
        windows=[window(w) for w in r.windows],
        wallet_balance_micros=r.wallet_balance_micros,
        replayed=r.replayed,
    )


def report_response(r: ReportResult) -> pb.ReportUsageResponse:
    return pb.ReportUsageResponse(
        usage_record_id=r.usage_record_id,
        replayed=r.replayed,
        windows=[window(w) for w in r.windows],
        cost_micros=r.cost_micros,
    )


def free_response(r: FreeResult) -> pb.FreeResponse:
    return pb.FreeResponse(windows=[window(w) for w in r.windows], replayed=r.replayed)


def usage_response(r: UsageReport) -> pb.GetUsageResponse:
    return pb.GetUsageResponse(
        plan_id=r.plan_id,
        subscription_status=r.subscription_status,
        trial_ends_at=_ts(r.trial_ends_at),
        resources=[
            pb.ResourceUsage(resource=res.resource, windows=[window(w) for w in res.windows])
            for res in r.resources
        ],
        wallet_balance_micros=r.wallet_balance_micros,
    )
