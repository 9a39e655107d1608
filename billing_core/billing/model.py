"""The billing domain's values: a plan's specification and the views the use cases answer
with (plans, tenants, subscriptions, wallets, prices, records, webhook events)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from billing_core.errors import InvalidRequest
from billing_core.rules.limits import DEFAULT_WARN_AT, Quota
from billing_core.rules.resources import Overage, Period, validate_resource

GRANT_OCCASIONS = ("start", "renewal", "upgrade")


@dataclass(frozen=True, slots=True)
class GrantSpec:
    """Credits a plan grants on an occasion (start, renewal, upgrade)."""

    on: str
    amount_micros: int
    expires_after_days: int | None = None


@dataclass(frozen=True, slots=True)
class PlanSpec:
    """The one canonical plan, as an operator writes it."""

    name: str
    price_cents: int
    quotas: tuple[Quota, ...] = ()
    description: str = ""
    currency: str = "usd"
    interval: str = "month"
    stripe_price_id: str | None = None
    active: bool = True
    trial: bool = False
    trial_days: int = 0
    priority: int = 0
    enterprise: bool = False
    unlimited: bool = False
    wallet_grants: tuple[GrantSpec, ...] = field(default_factory=tuple)

    def validate(self) -> None:
        if not self.name.strip():
            raise InvalidRequest("name is required")
        if self.price_cents < 0:
            raise InvalidRequest("price_cents must be >= 0")
        if self.interval not in {"month", "year"}:
            raise InvalidRequest("interval must be month or year")
        if self.trial and self.trial_days <= 0:
            raise InvalidRequest("trial_days must be > 0 when trial is true")
        validate_quotas(self.quotas)
        kinds = [g.on for g in self.wallet_grants]
        if len(kinds) != len(set(kinds)) or not set(kinds) <= set(GRANT_OCCASIONS):
            raise InvalidRequest("wallet_grants: at most one each of start, renewal, upgrade")
        for g in self.wallet_grants:
            if g.amount_micros <= 0:
                raise InvalidRequest("wallet grant amount_micros must be > 0")

    @property
    def self_serve(self) -> bool:
        """Sold through checkout: paid and not a contract."""
        return self.price_cents > 0 and not self.enterprise


def validate_quotas(quotas: tuple[Quota, ...]) -> None:
    seen: set[tuple[str, Period]] = set()
    for q in quotas:
        validate_resource(q.resource)
        if (q.resource, q.period) in seen:
            raise InvalidRequest(f"duplicate quota for ({q.resource}, {q.period.value})")
        seen.add((q.resource, q.period))
        if q.limit < 0:
            raise InvalidRequest(f"limit of {q.resource}/{q.period.value} must be >= 0")
        if any(not 0 < t <= 100 for t in q.warn_at):
            raise InvalidRequest("warn_at thresholds are percentages between 1 and 100")


def quota(
    resource: str,
    period: str,
    limit: int,
    *,
    overage: str = "block",
    warn_at: tuple[int, ...] = DEFAULT_WARN_AT,
) -> Quota:
    """A Quota from plain values (seed data, tests)."""
    return Quota(validate_resource(resource), Period(period), limit, warn_at, Overage(overage))


@dataclass(frozen=True, slots=True)
class PlanView:
    plan_id: str
    spec: PlanSpec
    version: int
    subscribers: int
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class TenantView:
    tenant_id: str
    name: str
    email: str
    timezone: str
    trial_used_at: datetime | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class CurrentSubscription:
    """The tenant's current subscription row with its plan's name and price."""

    subscription_id: str
    plan_id: str
    plan_name: str
    price_cents: int
    status: str
    trial_end: datetime | None
    current_period_start: datetime | None
    current_period_end: datetime | None
    cancel_at_period_end: bool
    stripe_customer_id: str | None
    stripe_subscription_id: str | None
    past_due_since: datetime | None
    enterprise: bool


@dataclass(frozen=True, slots=True)
class SubscriptionView:
    tenant_id: str
    subscription_id: str | None
    plan_id: str | None
    plan_name: str | None
    status: str  # a SubscriptionStatus value, or "none"
    trial_end: datetime | None
    current_period_start: datetime | None
    current_period_end: datetime | None
    cancel_at_period_end: bool
    stripe_customer_id: str | None
    stripe_subscription_id: str | None
    explanation: str
    past_due_since: datetime | None = None
    enterprise: bool = False


@dataclass(frozen=True, slots=True)
class GrantView:
    grant_id: str
    source: str
    amount_micros: int
    remaining_micros: int
    expires_at: datetime | None
    expired: bool
    reason: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class LedgerEntryView:
    entry_id: int
    grant_id: str
    kind: str
    delta_micros: int
    usage_record_id: str | None
    reason: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class PriceView:
    provider: str
    model: str
    effective_from: datetime
    input_micros_per_million: int
    output_micros_per_million: int


@dataclass(frozen=True, slots=True)
class NotificationView:
    notification_id: int
    kind: str
    message: str
    details: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True, slots=True)
class StoredEvent:
    event_id: str
    type: str
    status: str
    attempts: int
    last_error: str | None
    received_at: datetime
    processed_at: datetime | None


@dataclass(frozen=True, slots=True)
class RecordFilter:
    tenant_id: str
    resource: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def validate(self) -> None:
        if self.resource is not None:
            validate_resource(self.resource)
        if self.since and self.until and self.since >= self.until:
            raise InvalidRequest("since must be before until")


@dataclass(frozen=True, slots=True)
class ApiKeyView:
    """An API key as it may be shown: never its secret."""

    api_key_id: str
    name: str
    prefix: str
    scope: str
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True, slots=True)
class AuditEntryView:
    audit_id: int
    actor: str
    action: str
    entity_type: str
    entity_id: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class AuditFilter:
    actor: str | None = None
    action: str | None = None
    entity_type: str | None = None
    entity_id: str | None = None


@dataclass(frozen=True, slots=True)
class DayOfUsage:
    """One day (in the tenant's timezone) of one resource."""

    resource: str
    day: date
    amount: int
    cost_micros: int
