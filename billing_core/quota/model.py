"""The quota domain's own types: a tenant's plan and subscription at a moment, counter keys,
reservations, usage records, stored request_ids, upgrade offers, and the changes a batch of
decisions makes. Plain values; the database maps its rows onto them in billing_core/db."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any, NamedTuple

from billing_core.rules.limits import Access, Quota
from billing_core.rules.resources import Period

CounterKey = tuple[str, Period, datetime]  # resource, period, window_start
TenantKey = tuple[str, str, Period, datetime]  # tenant_id, resource, period, window_start
Counts = dict[CounterKey, tuple[int, int]]  # used, reserved
# what a decision answers once it is settled: a reservation's final states
SETTLED = ("committed", "released")


@dataclass(frozen=True, slots=True)
class TenantContext:
    """A tenant's timezone, billing anchor, subscription, plan quotas (overrides first) and
    live wallet at a moment, and whether lazily expiring state waits to be cleared."""

    tenant_id: str
    timezone: str
    anchor: datetime
    plan_id: str | None
    access: Access
    trial_end: datetime | None
    unlimited: bool
    enterprise: bool
    wallet_live_micros: int
    quotas: Mapping[str, tuple[Quota, ...]]
    # a reservation is past its expiry but still counted (it is released on the way)
    has_expired_reservations: bool = True
    # a wallet grant reached its expiry and still counts (it is expired on the way)
    has_due_grants: bool = True


@dataclass(frozen=True, slots=True)
class Reservation:
    reservation_id: str
    request_id: str
    resource: str
    amount: int
    windows: tuple[CounterKey, ...]  # the counter windows its amount went to
    held_micros: int  # what it may cost, held on the wallet while it is active
    status: str  # active, committed, released, expired
    expires_at: datetime
    commit_response: dict[str, Any] | None


class UsageRecord(NamedTuple):
    """One immutable usage record; the fields in the order of the CSV export (a tuple: one
    is built for every allowed request)."""

    usage_record_id: str
    occurred_at: datetime
    resource: str
    amount: int
    kind: str  # consume, commit, free, fail_open (a ReportUsage)
    request_id: str | None
    reservation_id: str | None
    plan_id: str | None
    provider: str | None
    model: str | None
    input_tokens: int
    output_tokens: int
    cost_micros: int
    wallet_charged_micros: int
    over_limit: bool
    labels: Mapping[str, str]


RECORD_FIELDS: tuple[str, ...] = UsageRecord._fields


class StoredKey(NamedTuple):
    """A live request_id: what it was used for and the answer it replays."""

    operation: str
    request_hash: str
    response: dict[str, Any]


@dataclass(frozen=True, slots=True)
class PlanOffer:
    """An active self-serve plan with its quotas of one resource (for upgrade offers)."""

    plan_id: str
    unlimited: bool
    quotas: tuple[Quota, ...]


@dataclass(frozen=True, slots=True)
class NewReservation:
    tenant_id: str
    reservation_id: str
    request_id: str
    resource: str
    amount: int
    windows: Sequence[CounterKey]
    held_micros: int
    labels: Mapping[str, str]
    expires_at: datetime

    def as_live(self) -> Reservation:
        """As a Commit finds it while it is active."""
        return Reservation(
            self.reservation_id, self.request_id, self.resource, self.amount,
            tuple(self.windows), self.held_micros, "active", self.expires_at, None,
        )  # fmt: skip


# tenant, kind, dedupe_key, message, details
Note = tuple[str, str, str, str, dict[str, Any]]


@dataclass(slots=True)
class Changes:
    """Everything one transaction of decisions writes, in the order it was decided."""

    deltas: dict[TenantKey, tuple[int, int]] = field(default_factory=dict)  # used, reserved
    dropped: list[TenantKey] = field(default_factory=list)  # locked empty, left empty
    records: list[tuple[str, UsageRecord]] = field(default_factory=list)
    reservations: list[NewReservation] = field(default_factory=list)
    # reservations committed, released or expired: tenant, reservation_id, status,
    # usage_record_id, commit_response (the last two None but for a commit)
    finished: dict[tuple[str, str], tuple[str, str | None, dict[str, Any] | None]] = field(
        default_factory=dict
    )
    debits: list[tuple[str, str, int]] = field(default_factory=list)  # tenant, grant, micros
    expired_grants: list[tuple[str, str]] = field(default_factory=list)  # tenant, grant
    # tenant, grant, kind, delta_micros, usage_record_id, reason — in order
    ledger: list[tuple[str, str, str, int, str | None, str]] = field(default_factory=list)
    wallets: dict[str, tuple[int, int]] = field(default_factory=dict)  # balance, held
    notes: list[Note] = field(default_factory=list)  # the first of a dedupe_key wins
    # tenant, request_id, operation, request_hash, response
    claims: list[tuple[str, str, str, str, dict[str, Any]]] = field(default_factory=list)
    # request_ids found free and left free (denials, errors): still free when the changes
    # are written, or another transaction answered a copy of the request meanwhile
    unclaimed: list[tuple[str, str]] = field(default_factory=list)

    def mark(self) -> tuple[dict[str, int], dict[str, dict[Any, Any]]]:
        """Where the changes stand: what rewind() goes back to."""
        lengths: dict[str, int] = {}
        copies: dict[str, dict[Any, Any]] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                lengths[f.name] = len(value)
            else:
                copies[f.name] = dict(value)
        return lengths, copies

    def rewind(self, mark: tuple[dict[str, int], dict[str, dict[Any, Any]]]) -> None:
        """Forget every change queued since `mark` (decisions that must not count)."""
        lengths, copies = mark
        for name, length in lengths.items():
            del getattr(self, name)[length:]
        for name, copy in copies.items():
            setattr(self, name, dict(copy))
