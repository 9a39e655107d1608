"""The quota requests: CheckAndConsume, Reserve, Commit, Release, Free, ReportUsage,
GetUsage and the sweep's Tidy, each with its validation and the fingerprint a retry must
match.

Transports build these from their wire messages; the engine never sees protobuf.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar

from billing_core.errors import InvalidRequest
from billing_core.rules.pricing import TokenUsage
from billing_core.rules.resources import validate_resource

MAX_REQUEST_ID = 128
MAX_LABELS = 32
MAX_LABEL_CHARS = 256
DEFAULT_TTL_SECONDS = 300
MAX_TTL_SECONDS = 3600
_EMPTY: Mapping[str, str] = {}
_quote = json.encoder.encode_basestring_ascii  # a JSON string as json.dumps writes it


def _require_text(name: str, value: str) -> None:
    if "\x00" in value:
        raise InvalidRequest(f"{name} must not contain NUL characters")


def _require_tenant(tenant_id: str) -> None:
    if not tenant_id or len(tenant_id) > 128:
        raise InvalidRequest("tenant_id is required (at most 128 characters)")
    _require_text("tenant_id", tenant_id)


def _require_amount(amount: int) -> None:
    if amount <= 0:
        raise InvalidRequest(f"amount must be a positive integer, got {amount}")


def _require_request_id(request_id: str) -> None:
    if not request_id or len(request_id) > MAX_REQUEST_ID:
        raise InvalidRequest("request_id is required (the idempotency key, at most 128 characters)")
    _require_text("request_id", request_id)


def _require_labels(labels: Mapping[str, str]) -> None:
    if len(labels) > MAX_LABELS:
        raise InvalidRequest(f"at most {MAX_LABELS} labels")
    for key, value in labels.items():
        if not key or len(key) > MAX_LABEL_CHARS or len(value) > MAX_LABEL_CHARS:
            raise InvalidRequest(
                f"label keys must be non-empty; keys and values ≤ {MAX_LABEL_CHARS}"
            )
        _require_text("labels", key + value)


def _require_reservation_id(reservation_id: str) -> None:
    if not reservation_id or len(reservation_id) > 40:
        raise InvalidRequest("reservation_id is required")
    _require_text("reservation_id", reservation_id)


@dataclass(frozen=True, slots=True)
class ConsumeRequest:
    tenant_id: str
    resource: str
    amount: int
    request_id: str
    dry_run: bool = False
    tokens: TokenUsage | None = None
    labels: Mapping[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        _require_tenant(self.tenant_id)
        validate_resource(self.resource)
        _require_amount(self.amount)
        _require_request_id(self.request_id)
        _require_labels(self.labels)
        if self.tokens is not None:
            self.tokens.validate()

    # an admission: CheckAndConsume uses the amount at once, Reserve holds it for a while
    OPERATION: ClassVar[str] = "consume"

    @property
    def hold_seconds(self) -> int | None:
        """How long an admitted request holds its amount (None: it is used at once)."""
        return None

    def admission_fingerprint(self) -> str:
        """The fingerprint stored with the request_id of this admission."""
        return self.fingerprint(self.OPERATION)

    def fingerprint(self, operation: str, extra: Mapping[str, Any] = _EMPTY) -> str:
        """What must match for a retry with the same request_id to be the same request: the
        SHA-256 of the request's canonical JSON (sorted keys, json.dumps' separators and
        ASCII escapes), which is stored with the key and so must never change."""
        if not extra:  # CheckAndConsume: the same text, written out several times faster
            return hashlib.sha256(self._canonical(operation).encode()).hexdigest()
        tokens = self.tokens
        body = {
            "op": operation,
            "resource": self.resource,
            "amount": self.amount,
            "tokens": None
            if tokens is None
            else [tokens.provider, tokens.model, tokens.input_tokens, tokens.output_tokens],
            "labels": dict(sorted(self.labels.items())),
            **extra,
        }
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    def _canonical(self, operation: str) -> str:
        t = self.tokens
        tokens = (
            "null"
            if t is None
            else f"[{_quote(t.provider)}, {_quote(t.model)}, {t.input_tokens:d}, "
            f"{t.output_tokens:d}]"
        )
        labels = ", ".join(f"{_quote(k)}: {_quote(v)}" for k, v in sorted(self.labels.items()))
        return (
            f'{{"amount": {self.amount:d}, "labels": {{{labels}}}, "op": {_quote(operation)}, '
            f'"resource": {_quote(self.resource)}, "tokens": {tokens}}}'
        )


@dataclass(frozen=True, slots=True)
class ReserveRequest(ConsumeRequest):
    ttl_seconds: int = DEFAULT_TTL_SECONDS
    OPERATION: ClassVar[str] = "reserve"

    @property
    def hold_seconds(self) -> int | None:
        return self.ttl_seconds

    def admission_fingerprint(self) -> str:
        return self.fingerprint(self.OPERATION, {"ttl": self.ttl_seconds})

    def validate(self) -> None:
        ConsumeRequest.validate(self)
        if not 0 < self.ttl_seconds <= MAX_TTL_SECONDS:
            raise InvalidRequest(f"ttl_seconds must be between 1 and {MAX_TTL_SECONDS}")


@dataclass(frozen=True, slots=True)
class CommitRequest:
    tenant_id: str
    reservation_id: str
    amount: int
    tokens: TokenUsage | None = None
    labels: Mapping[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        _require_tenant(self.tenant_id)
        _require_reservation_id(self.reservation_id)
        _require_amount(self.amount)
        _require_labels(self.labels)
        if self.tokens is not None:
            self.tokens.validate()

    def fingerprint(self) -> str:
        """What a repeated Commit must match to be replayed (stored with the reservation)."""
        return ConsumeRequest(
            self.tenant_id, "tokens", self.amount, "commit", tokens=self.tokens, labels=self.labels
        ).fingerprint("commit")


@dataclass(frozen=True, slots=True)
class ReleaseRequest:
    tenant_id: str
    reservation_id: str

    def validate(self) -> None:
        _require_tenant(self.tenant_id)
        _require_reservation_id(self.reservation_id)


@dataclass(frozen=True, slots=True)
class FreeRequest:
    tenant_id: str
    resource: str
    amount: int
    request_id: str

    def validate(self) -> None:
        _require_tenant(self.tenant_id)
        validate_resource(self.resource)
        _require_amount(self.amount)
        _require_request_id(self.request_id)

    def fingerprint(self) -> str:
        body = {"op": "free", "resource": self.resource, "amount": self.amount}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class ReportRequest:
    """ReportUsage: usage a client allowed while the sidecar could not be reached (it
    fell open), reported afterwards. Never denied; counted into the windows that contain
    `occurred_at`, even past a limit; recorded as fail-open."""

    tenant_id: str
    resource: str
    amount: int
    request_id: str
    occurred_at: datetime
    tokens: TokenUsage | None = None
    labels: Mapping[str, str] = field(default_factory=dict)

    OPERATION: ClassVar[str] = "report"

    def validate(self) -> None:
        _require_tenant(self.tenant_id)
        validate_resource(self.resource)
        _require_amount(self.amount)
        _require_request_id(self.request_id)
        _require_labels(self.labels)
        if self.tokens is not None:
            self.tokens.validate()
        if self.occurred_at.tzinfo is None:
            raise InvalidRequest("occurred_at is required (a moment with its timezone)")

    def as_admission(self) -> ConsumeRequest:
        """The CheckAndConsume the client asked before it fell open."""
        return ConsumeRequest(
            self.tenant_id, self.resource, self.amount, self.request_id,
            tokens=self.tokens, labels=self.labels,
        )  # fmt: skip

    def fingerprint(self) -> str:
        return self.as_admission().fingerprint(
            self.OPERATION, {"occurred_at": self.occurred_at.isoformat()}
        )


@dataclass(frozen=True, slots=True)
class UsageRequest:
    tenant_id: str
    resource: str | None = None

    def validate(self) -> None:
        _require_tenant(self.tenant_id)
        if self.resource is not None:
            validate_resource(self.resource)


@dataclass(frozen=True, slots=True)
class TidyRequest:
    """Release the tenant's reservations past their expiry and expire its grants past
    theirs — what every transaction that writes for a tenant does on the way; the sweep
    asks for it for tenants no call reaches."""

    tenant_id: str

    def validate(self) -> None:
        _require_tenant(self.tenant_id)


MAX_GROUP = 32


@dataclass(frozen=True, slots=True)
class AdmitAllRequest:
    """Several CheckAndConsumes of one tenant decided all-or-nothing: each is decided in
    order against the state the ones before it leave, and unless every one is allowed none
    of them counts (Envoy's rate-limit descriptors of one HTTP request)."""

    tenant_id: str
    members: tuple[ConsumeRequest, ...]

    def validate(self) -> None:
        _require_tenant(self.tenant_id)
        if not 0 < len(self.members) <= MAX_GROUP:
            raise InvalidRequest(f"between 1 and {MAX_GROUP} requests are decided together")
        ids = set()
        for member in self.members:
            if member.tenant_id != self.tenant_id:
                raise InvalidRequest("the requests decided together must be of one tenant")
            if member.dry_run or member.hold_seconds is not None:
                raise InvalidRequest("only CheckAndConsumes that count are decided together")
            member.validate()
            ids.add(member.request_id)
        if len(ids) != len(self.members):
            raise InvalidRequest("the requests decided together need distinct request_ids")


# what a batch decides: CheckAndConsume or Reserve (a ReserveRequest), several
# CheckAndConsumes all-or-nothing, Commit, Release, Free, ReportUsage, Tidy
Request = (
    ConsumeRequest
    | AdmitAllRequest
    | CommitRequest
    | ReleaseRequest
    | FreeRequest
    | ReportRequest
    | TidyRequest
)
