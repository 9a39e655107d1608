"""Request building and fail-open/closed answers shared by the sync and async clients."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

import grpc
from quota.v1 import quota_service_pb2 as pb


class FailureMode(Enum):
    """What a call returns when the sidecar cannot be reached after retries."""

    RAISE = "raise"  # raise QuotaUnavailable (the default: the caller decides)
    OPEN = "open"  # answer allowed=true: availability over enforcement
    CLOSED = "closed"  # answer allowed=false: enforcement over availability


class QuotaUnavailable(Exception):
    """The sidecar could not be reached (after retries) and the call asked to raise."""


@dataclass(frozen=True, slots=True)
class Tokens:
    provider: str
    model: str
    input_tokens: int = 0
    output_tokens: int = 0

    def to_pb(self) -> pb.TokenUsage:
        return pb.TokenUsage(
            provider=self.provider,
            model=self.model,
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
        )


RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})
UNREACHABLE_MESSAGE = "quota sidecar unreachable: {verdict} by the caller's {mode} choice"


def new_request_id() -> str:
    return uuid.uuid4().hex


def consume_request(
    tenant_id: str,
    resource: str,
    amount: int,
    request_id: str | None,
    dry_run: bool,
    tokens: Tokens | None,
    labels: Mapping[str, str] | None,
) -> pb.CheckAndConsumeRequest:
    return pb.CheckAndConsumeRequest(
        tenant_id=tenant_id,
        resource=resource,
        amount=amount,
        request_id=request_id or new_request_id(),
        dry_run=dry_run,
        tokens=tokens.to_pb() if tokens else None,
        labels=dict(labels or {}),
    )


def reserve_request(
    tenant_id: str,
    resource: str,
    amount: int,
    request_id: str | None,
    ttl_seconds: int,
    tokens: Tokens | None,
    labels: Mapping[str, str] | None,
) -> pb.ReserveRequest:
    return pb.ReserveRequest(
        tenant_id=tenant_id,
        resource=resource,
        amount=amount,
        request_id=request_id or new_request_id(),
        ttl_seconds=ttl_seconds,
        tokens=tokens.to_pb() if tokens else None,
        labels=dict(labels or {}),
    )


def commit_request(
    tenant_id: str,
    reservation_id: str,
    amount: int,
    tokens: Tokens | None,
    labels: Mapping[str, str] | None,
) -> pb.CommitRequest:
    return pb.CommitRequest(
        tenant_id=tenant_id,
        reservation_id=reservation_id,
        amount=amount,
        tokens=tokens.to_pb() if tokens else None,
        labels=dict(labels or {}),
    )


def unreachable_consume(mode: FailureMode, *, spooled: bool = False) -> pb.CheckAndConsumeResponse:
    allowed = mode is FailureMode.OPEN
    message = UNREACHABLE_MESSAGE.format(
        verdict="allowed" if allowed else "denied", mode=f"fail-{mode.value}"
    )
    return pb.CheckAndConsumeResponse(
        allowed=allowed,
        reason=pb.REASON_UNSPECIFIED,
        message=message + ("; spooled, reported when the sidecar answers" if spooled else ""),
    )


def unreachable_reserve(mode: FailureMode) -> pb.ReserveResponse:
    consume = unreachable_consume(mode)
    return pb.ReserveResponse(
        allowed=consume.allowed, reason=consume.reason, message=consume.message
    )


def metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()
