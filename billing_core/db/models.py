"""The whole schema as typed SQLAlchemy 2.0 models; Alembic migrations must match it.

Rules: money is an integer with its unit in the name; timestamps are timestamptz (UTC);
every tenant-owned table has tenant_id first in its primary key.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    ForeignKey,
    ForeignKeyConstraint,
    Identity,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

TS = DateTime(timezone=True)
RESOURCE_CHECK = (
    "resource IN ('tokens','messages','agents','bots','boards','companions','files',"
    "'storage','research_runs','tool_calls','media_processing') "
    "OR resource ~ '^custom:[a-z0-9][a-z0-9_.-]{0,62}$'"
)
PERIOD_CHECK = "period IN ('daily','weekly','monthly','overall','cumulative')"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: TS, dict[str, Any]: JSONB}  # noqa: RUF012


def _created() -> Mapped[datetime]:
    return mapped_column(TS, server_default=func.now())


class Plan(Base):
    __tablename__ = "plans"
    __table_args__ = (
        CheckConstraint("price_cents >= 0", name="price_nonnegative"),
        CheckConstraint("interval IN ('month','year')", name="interval_known"),
        CheckConstraint("NOT trial OR trial_days > 0", name="trial_days_positive"),
        CheckConstraint("currency ~ '^[a-z]{3}$'", name="currency_iso"),
        Index("uq_plans_active_name", "name", unique=True, postgresql_where=text("active")),
    )

    plan_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, server_default="")
    price_cents: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3), server_default="usd")
    interval: Mapped[str] = mapped_column(String(8), server_default="month")
    stripe_price_id: Mapped[str | None] = mapped_column(String(255))
    stripe_product_id: Mapped[str | None] = mapped_column(String(255))
    active: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))
    trial: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    trial_days: Mapped[int] = mapped_column(Integer, server_default="0")
    priority: Mapped[int] = mapped_column(Integer, server_default="0")
    enterprise: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    unlimited: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    # bumped on every change so caches of the plan can tell they are stale
    version: Mapped[int] = mapped_column(Integer, server_default="1")
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _created()


class PlanStripePrice(Base):
    """Every provider price a plan was ever sold at: subscribers keep an old price when the
    plan's price changes, and their webhooks must still find the plan."""

    __tablename__ = "plan_stripe_prices"

    stripe_price_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    plan_id: Mapped[str] = mapped_column(ForeignKey("plans.plan_id"), index=True)
    created_at: Mapped[datetime] = _created()


class PlanQuota(Base):
    __tablename__ = "plan_quotas"
    __table_args__ = (
        CheckConstraint(RESOURCE_CHECK, name="resource_known"),
        CheckConstraint(PERIOD_CHECK, name="period_known"),
        CheckConstraint('"limit" >= 0', name="limit_nonnegative"),
        CheckConstraint("overage IN ('block','wallet')", name="overage_known"),
    )

    plan_id: Mapped[str] = mapped_column(
        ForeignKey("plans.plan_id", ondelete="CASCADE"), primary_key=True
    )
    resource: Mapped[str] = mapped_column(String(72), primary_key=True)
    period: Mapped[str] = mapped_column(String(16), primary_key=True)
    limit: Mapped[int] = mapped_column(BigInteger)
    warn_at: Mapped[list[int]] = mapped_column(
        ARRAY(Integer), server_default=text("'{80,95}'::integer[]")
    )
    overage: Mapped[str] = mapped_column(String(8), server_default="block")


class PlanWalletGrant(Base):
    __tablename__ = "plan_wallet_grants"
    __table_args__ = (
        CheckConstraint("grant_on IN ('start','renewal','upgrade')", name="grant_on_known"),
        CheckConstraint("amount_micros > 0", name="amount_positive"),
        CheckConstraint(
            "expires_after_days IS NULL OR expires_after_days > 0", name="expiry_positive"
        ),
    )

    plan_id: Mapped[str] = mapped_column(
        ForeignKey("plans.plan_id", ondelete="CASCADE"), primary_key=True
    )
    grant_on: Mapped[str] = mapped_column(String(16), primary_key=True)
    amount_micros: Mapped[int] = mapped_column(BigInteger)
    expires_after_days: Mapped[int | None] = mapped_column(Integer)


class Tenant(Base):
    __tablename__ = "tenants"

    tenant_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    email: Mapped[str] = mapped_column(String(320), server_default="")
    timezone: Mapped[str] = mapped_column(String(64), server_default="UTC")
    # the tenant's customer at the payment provider, created at the first checkout (one
    # tenant per customer: provider_customers, keyed by the customer, holds that)
    stripe_customer_id: Mapped[str | None] = mapped_column(String(255))
    # one trial per tenant, ever
    trial_used_at: Mapped[datetime | None] = mapped_column(TS)
    created_at: Mapped[datetime] = _created()


class ProviderCustomer(Base):
    """Which tenant a payment provider's customer belongs to: how a webhook, which names
    the customer only, finds its tenant. Keyed by the customer, so the lookup is one row
    wherever the tenants' rows are (a table of its own when distributed by tenant)."""

    __tablename__ = "provider_customers"

    stripe_customer_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = _created()


class Subscription(Base):
    __tablename__ = "subscriptions"
    __table_args__ = (
        CheckConstraint(
            "status IN ('trialing','active','past_due','unpaid','incomplete',"
            "'incomplete_expired','trial_expired','canceled')",
            name="status_known",
        ),
        # at most one current subscription per tenant, enforced by the database
        Index(
            "uq_subscriptions_one_current",
            "tenant_id",
            unique=True,
            postgresql_where=text("is_current"),
        ),
        # unique within the tenant: every unique constraint of a tenant's rows includes
        # tenant_id, so the table can be distributed by it
        UniqueConstraint("tenant_id", "stripe_subscription_id"),
    )

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.tenant_id"), primary_key=True)
    subscription_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    plan_id: Mapped[str] = mapped_column(ForeignKey("plans.plan_id"))
    status: Mapped[str] = mapped_column(String(24))
    is_current: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))
    stripe_customer_id: Mapped[str | None] = mapped_column(String(255))
    stripe_subscription_id: Mapped[str | None] = mapped_column(String(255))
    current_period_start: Mapped[datetime | None] = mapped_column(TS)
    current_period_end: Mapped[datetime | None] = mapped_column(TS)
    billing_cycle_anchor: Mapped[datetime] = mapped_column(TS)
    trial_start: Mapped[datetime | None] = mapped_column(TS)
    trial_end: Mapped[datetime | None] = mapped_column(TS)
    cancel_at_period_end: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    past_due_since: Mapped[datetime | None] = mapped_column(TS)
    canceled_at: Mapped[datetime | None] = mapped_column(TS)
    # Stripe's own timestamp of the newest event applied: older events never overwrite
    stripe_state_at: Mapped[int] = mapped_column(BigInteger, server_default="0")
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _created()


class QuotaOverride(Base):
    __tablename__ = "quota_overrides"
    __table_args__ = (
        CheckConstraint(RESOURCE_CHECK, name="resource_known"),
        CheckConstraint(PERIOD_CHECK, name="period_known"),
        CheckConstraint('"limit" >= 0', name="limit_nonnegative"),
        CheckConstraint("overage IN ('block','wallet')", name="overage_known"),
    )

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.tenant_id"), primary_key=True)
    resource: Mapped[str] = mapped_column(String(72), primary_key=True)
    period: Mapped[str] = mapped_column(String(16), primary_key=True)
    limit: Mapped[int] = mapped_column(BigInteger)
    warn_at: Mapped[list[int]] = mapped_column(
        ARRAY(Integer), server_default=text("'{80,95}'::integer[]")
    )
    overage: Mapped[str] = mapped_column(String(8), server_default="block")
    created_at: Mapped[datetime] = _created()


class UsageCounter(Base):
    """One window's running totals; a new window is a new row (lazy reset)."""

    __tablename__ = "usage_counters"
    __table_args__ = (
        CheckConstraint("used >= 0", name="used_nonnegative"),
        CheckConstraint("reserved >= 0", name="reserved_nonnegative"),
    )

    tenant_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    resource: Mapped[str] = mapped_column(String(72), primary_key=True)
    period: Mapped[str] = mapped_column(String(16), primary_key=True)
    window_start: Mapped[datetime] = mapped_column(TS, primary_key=True)
    used: Mapped[int] = mapped_column(BigInteger, server_default="0")
    reserved: Mapped[int] = mapped_column(BigInteger, server_default="0")


class UsageRecord(Base):
    """Immutable: a trigger rejects UPDATE and DELETE."""

    __tablename__ = "usage_records"
    __table_args__ = (
        CheckConstraint("kind IN ('consume','commit','free','fail_open')", name="kind_known"),
        CheckConstraint("cost_micros >= 0", name="cost_nonnegative"),
        Index("ix_usage_records_tenant_time", "tenant_id", "occurred_at"),
    )

    tenant_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    usage_record_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    resource: Mapped[str] = mapped_column(String(72))
    # signed: a free of a cumulative resource is negative
    amount: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(16))
    request_id: Mapped[str | None] = mapped_column(String(128))
    reservation_id: Mapped[str | None] = mapped_column(String(40))
    plan_id: Mapped[str | None] = mapped_column(String(64))
    provider: Mapped[str | None] = mapped_column(String(64))
    model: Mapped[str | None] = mapped_column(String(128))
    input_tokens: Mapped[int] = mapped_column(BigInteger, server_default="0")
    output_tokens: Mapped[int] = mapped_column(BigInteger, server_default="0")
    cost_micros: Mapped[int] = mapped_column(BigInteger, server_default="0")
    wallet_charged_micros: Mapped[int] = mapped_column(BigInteger, server_default="0")
    over_limit: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    labels: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    occurred_at: Mapped[datetime] = mapped_column(TS)


class UsageDaily(Base):
    """A day of a tenant's usage of a resource (a day in the tenant's timezone), summed
    from its records up to the day's mark (usage_daily_marks). Records never change, so a
    day once summed stays summed. Charts read these instead of the history."""

    __tablename__ = "usage_daily"

    tenant_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    resource: Mapped[str] = mapped_column(String(72), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    amount: Mapped[int] = mapped_column(BigInteger)
    cost_micros: Mapped[int] = mapped_column(BigInteger)


class UsageDailyMark(Base):
    """How far a day of a tenant's usage is summed into usage_daily: the day's end once
    it is over, else a moment of today (the records after it are read as they are)."""

    __tablename__ = "usage_daily_marks"

    tenant_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    summed_until: Mapped[datetime] = mapped_column(TS)


class Reservation(Base):
    __tablename__ = "reservations"
    __table_args__ = (
        CheckConstraint(
            "status IN ('active','committed','released','expired')", name="status_known"
        ),
        CheckConstraint("amount > 0", name="amount_positive"),
        Index(
            "ix_reservations_live",
            "tenant_id",
            "resource",
            "expires_at",
            postgresql_where=text("status = 'active'"),
        ),
        Index("ix_reservations_expiry", "expires_at", postgresql_where=text("status = 'active'")),
    )

    tenant_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    reservation_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(128))
    resource: Mapped[str] = mapped_column(String(72))
    amount: Mapped[int] = mapped_column(BigInteger)
    # the counter windows the amount was added to: [{"period": ..., "window_start": ...}]
    windows: Mapped[list[dict[str, str]]] = mapped_column(JSONB)
    held_micros: Mapped[int] = mapped_column(BigInteger, server_default="0")
    status: Mapped[str] = mapped_column(String(16), server_default="active")
    labels: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    expires_at: Mapped[datetime] = mapped_column(TS)
    created_at: Mapped[datetime] = mapped_column(TS)
    finished_at: Mapped[datetime | None] = mapped_column(TS)
    usage_record_id: Mapped[str | None] = mapped_column(String(40))
    # the Commit response, replayed when Commit is called again
    commit_response: Mapped[dict[str, Any] | None] = mapped_column(JSONB)


class IdempotencyKey(Base):
    """The first allowed response to a request_id, replayed on retries."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (Index("ix_idempotency_keys_expires_at", "expires_at"),)

    tenant_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    operation: Mapped[str] = mapped_column(String(16))
    request_hash: Mapped[str] = mapped_column(String(64))
    response: Mapped[dict[str, Any]] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(TS)
    expires_at: Mapped[datetime] = mapped_column(TS)


class Wallet(Base):
    __tablename__ = "wallets"
    __table_args__ = (
        CheckConstraint("balance_micros >= 0", name="balance_nonnegative"),
        CheckConstraint("held_micros >= 0", name="held_nonnegative"),
    )

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.tenant_id"), primary_key=True)
    # always equal to the sum of the ledger
    balance_micros: Mapped[int] = mapped_column(BigInteger, server_default="0")
    # set aside for live reservations
    held_micros: Mapped[int] = mapped_column(BigInteger, server_default="0")
    updated_at: Mapped[datetime] = _created()


class WalletGrant(Base):
    __tablename__ = "wallet_grants"
    __table_args__ = (
        CheckConstraint("amount_micros > 0", name="amount_positive"),
        CheckConstraint(
            "remaining_micros >= 0 AND remaining_micros <= amount_micros", name="remaining_range"
        ),
        CheckConstraint("source IN ('start','renewal','upgrade','manual')", name="source_known"),
        # a plan grant is applied once per subscription + period + kind
        UniqueConstraint("tenant_id", "grant_key"),
        # the sweep's way to grants past their expiry that still pay (quota_store): the live
        # grants only; led by tenant_id so that a cached generic plan of a one-tenant lookup
        # that picks it reads that tenant's entries, never every live grant's
        Index(
            "ix_wallet_grants_due",
            "tenant_id",
            "expires_at",
            postgresql_where=text("NOT expired"),
        ),
    )

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.tenant_id"), primary_key=True)
    grant_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    grant_key: Mapped[str] = mapped_column(String(255))
    source: Mapped[str] = mapped_column(String(16))
    amount_micros: Mapped[int] = mapped_column(BigInteger)
    remaining_micros: Mapped[int] = mapped_column(BigInteger)
    expires_at: Mapped[datetime | None] = mapped_column(TS)
    reason: Mapped[str] = mapped_column(Text, server_default="")
    expired: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    created_at: Mapped[datetime] = mapped_column(TS)


class WalletLedgerEntry(Base):
    """Append-only like usage_records."""

    __tablename__ = "wallet_ledger"
    __table_args__ = (
        CheckConstraint("kind IN ('grant','debit','expire','refund')", name="kind_known"),
        ForeignKeyConstraint(
            ["tenant_id", "grant_id"], ["wallet_grants.tenant_id", "wallet_grants.grant_id"]
        ),
    )

    tenant_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    entry_id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    grant_id: Mapped[str] = mapped_column(String(40))
    kind: Mapped[str] = mapped_column(String(16))
    delta_micros: Mapped[int] = mapped_column(BigInteger)
    usage_record_id: Mapped[str | None] = mapped_column(String(40))
    reason: Mapped[str] = mapped_column(Text, server_default="")
    created_at: Mapped[datetime] = mapped_column(TS)


class ModelPriceRow(Base):
    __tablename__ = "model_prices"
    __table_args__ = (
        CheckConstraint("input_micros_per_million >= 0", name="input_nonnegative"),
        CheckConstraint("output_micros_per_million >= 0", name="output_nonnegative"),
    )

    provider: Mapped[str] = mapped_column(String(64), primary_key=True)
    model: Mapped[str] = mapped_column(String(128), primary_key=True)
    effective_from: Mapped[datetime] = mapped_column(TS, primary_key=True)
    input_micros_per_million: Mapped[int] = mapped_column(BigInteger)
    output_micros_per_million: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = _created()


class StripeWebhookEvent(Base):
    __tablename__ = "stripe_webhook_events"
    __table_args__ = (
        CheckConstraint(
            "status IN ('received','processed','failed','ignored')", name="status_known"
        ),
        Index("ix_stripe_webhook_events_status", "status"),
    )

    event_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    type: Mapped[str] = mapped_column(String(128))
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB)
    status: Mapped[str] = mapped_column(String(16), server_default="received")
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    last_error: Mapped[str | None] = mapped_column(Text)
    stripe_created_at: Mapped[datetime | None] = mapped_column(TS)
    received_at: Mapped[datetime] = _created()
    processed_at: Mapped[datetime | None] = mapped_column(TS)


class Notification(Base):
    __tablename__ = "notifications"
    __table_args__ = (
        # a threshold crossing is recorded once per window
        UniqueConstraint("tenant_id", "dedupe_key"),
        Index("ix_notifications_tenant_created", "tenant_id", "created_at"),
    )

    tenant_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    notification_id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    dedupe_key: Mapped[str] = mapped_column(String(255))
    message: Mapped[str] = mapped_column(Text)
    details: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    created_at: Mapped[datetime] = mapped_column(TS)


class AuditLogEntry(Base):
    """Append-only like usage_records."""

    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_entity", "entity_type", "entity_id"),)

    audit_id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    entity_type: Mapped[str] = mapped_column(String(64))
    entity_id: Mapped[str] = mapped_column(String(255))
    before: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    after: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    created_at: Mapped[datetime] = _created()


class ApiKey(Base):
    __tablename__ = "api_keys"
    __table_args__ = (CheckConstraint("scope IN ('admin','read')", name="scope_known"),)

    api_key_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    # sha256 of the key; the key itself is shown once and never stored
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    # admin: everything; read: GET requests only
    scope: Mapped[str] = mapped_column(String(16), server_default="admin")
    created_at: Mapped[datetime] = _created()
    revoked_at: Mapped[datetime | None] = mapped_column(TS)


class HttpIdempotencyKey(Base):
    """Responses of money-moving POSTs, replayed for the same Idempotency-Key."""

    __tablename__ = "http_idempotency_keys"

    api_key_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    status_code: Mapped[int] = mapped_column(Integer)
    response_body: Mapped[dict[str, Any]] = mapped_column(JSONB)
    created_at: Mapped[datetime] = _created()


APPEND_ONLY_TABLES: tuple[str, ...] = ("usage_records", "wallet_ledger", "audit_log")
