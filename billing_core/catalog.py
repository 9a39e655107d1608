"""Plans, tenants, subscriptions, overrides, prices and grants: the catalogue use cases.

The control plane's API, the CLI's seed-demo and the tests all change the catalogue
through these functions (never with their own SQL).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from psycopg import errors as pg_errors

from billing_core.db import quota_store as store
from billing_core.db.quota_store import Conn
from billing_core.errors import Conflict, InvalidRequest, NotFound
from billing_core.ids import new_id
from billing_core.limits import DEFAULT_WARN_AT, Quota, SubscriptionStatus
from billing_core.periods import tenant_zone
from billing_core.resources import Overage, Period, validate_resource

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")


@dataclass(frozen=True, slots=True)
class GrantSpec:
    on: str  # start | renewal | upgrade
    amount_micros: int
    expires_after_days: int | None = None


@dataclass(frozen=True, slots=True)
class PlanSpec:
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
        seen: set[tuple[str, Period]] = set()
        for q in self.quotas:
            validate_resource(q.resource)
            if (q.resource, q.period) in seen:
                raise InvalidRequest(f"duplicate quota for ({q.resource}, {q.period.value})")
            seen.add((q.resource, q.period))
            if q.limit < 0:
                raise InvalidRequest(f"limit of {q.resource}/{q.period.value} must be >= 0")
            if any(not 0 < t <= 100 for t in q.warn_at):
                raise InvalidRequest("warn_at thresholds are percentages between 1 and 100")
        kinds = [g.on for g in self.wallet_grants]
        if len(kinds) != len(set(kinds)) or not set(kinds) <= {"start", "renewal", "upgrade"}:
            raise InvalidRequest("wallet_grants: at most one each of start, renewal, upgrade")
        for g in self.wallet_grants:
            if g.amount_micros <= 0:
                raise InvalidRequest("wallet grant amount_micros must be > 0")


def _check_id(kind: str, value: str) -> str:
    if not _ID.match(value):
        raise InvalidRequest(f"{kind} must be 1-64 characters of letters, digits, _ . : -")
    return value


async def create_plan(conn: Conn, spec: PlanSpec, now: datetime, plan_id: str | None = None) -> str:
    spec.validate()
    plan_id = _check_id("plan_id", plan_id) if plan_id else new_id("plan", now)
    try:
        async with conn.transaction():
            await conn.execute(
                'INSERT INTO plans (plan_id, name, description, price_cents, currency, "interval",'
                " stripe_price_id, active, trial, trial_days, priority, enterprise, unlimited,"
                " created_at, updated_at)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    plan_id,
                    spec.name,
                    spec.description,
                    spec.price_cents,
                    spec.currency,
                    spec.interval,
                    spec.stripe_price_id,
                    spec.active,
                    spec.trial,
                    spec.trial_days,
                    spec.priority,
                    spec.enterprise,
                    spec.unlimited,
                    now,
                    now,
                ),
            )
            await write_plan_children(conn, plan_id, spec)
            if spec.stripe_price_id:
                await remember_stripe_price(conn, plan_id, spec.stripe_price_id)
    except pg_errors.UniqueViolation as exc:
        raise Conflict(f"a plan with id {plan_id!r} or active name {spec.name!r} exists") from exc
    return plan_id


async def remember_stripe_price(conn: Conn, plan_id: str, price_id: str) -> None:
    """Keep the price → plan link for good (subscribers stay on old prices)."""
    cur = await conn.execute(
        "INSERT INTO plan_stripe_prices (stripe_price_id, plan_id) VALUES (%s, %s)"
        " ON CONFLICT (stripe_price_id) DO UPDATE SET stripe_price_id = EXCLUDED.stripe_price_id"
        " RETURNING plan_id",
        (price_id, plan_id),
    )
    row = await cur.fetchone()
    if row is None or row[0] != plan_id:
        raise Conflict(f"Stripe price {price_id!r} already belongs to plan {row and row[0]!r}")


async def plan_for_stripe_price(conn: Conn, price_id: str) -> str | None:
    cur = await conn.execute(
        "SELECT plan_id FROM plan_stripe_prices WHERE stripe_price_id = %s", (price_id,)
    )
    row = await cur.fetchone()
    return None if row is None else str(row[0])


async def write_plan_children(conn: Conn, plan_id: str, spec: PlanSpec) -> None:
    for q in spec.quotas:
        await conn.execute(
            'INSERT INTO plan_quotas (plan_id, resource, period, "limit", warn_at, overage)'
            " VALUES (%s, %s, %s, %s, %s, %s)",
            (plan_id, q.resource, q.period.value, q.limit, list(q.warn_at), q.overage.value),
        )
    for g in spec.wallet_grants:
        await conn.execute(
            "INSERT INTO plan_wallet_grants (plan_id, grant_on, amount_micros, expires_after_days)"
            " VALUES (%s, %s, %s, %s)",
            (plan_id, g.on, g.amount_micros, g.expires_after_days),
        )


async def create_tenant(
    conn: Conn,
    tenant_id: str,
    name: str,
    now: datetime,
    *,
    email: str = "",
    timezone: str = "UTC",
) -> None:
    if not tenant_id or len(tenant_id) > 128:
        raise InvalidRequest("tenant_id is required (at most 128 characters)")
    tenant_zone(timezone)
    try:
        await conn.execute(
            "INSERT INTO tenants (tenant_id, name, email, timezone, created_at)"
            " VALUES (%s, %s, %s, %s, %s)",
            (tenant_id, name, email, timezone, now),
        )
    except pg_errors.UniqueViolation as exc:
        raise Conflict(f"tenant {tenant_id!r} exists") from exc


async def assign_plan(
    conn: Conn,
    tenant_id: str,
    plan_id: str,
    now: datetime,
    *,
    status: SubscriptionStatus = SubscriptionStatus.ACTIVE,
    trial_end: datetime | None = None,
    anchor: datetime | None = None,
    past_due_since: datetime | None = None,
) -> str:
    """Make `plan_id` the tenant's current subscription (the previous one stops being
    current) and credit the plan's start grant once."""
    subscription_id = new_id("sub", now)
    async with conn.transaction():
        cur = await conn.execute("SELECT 1 FROM plans WHERE plan_id = %s", (plan_id,))
        if await cur.fetchone() is None:
            raise NotFound(f"unknown plan {plan_id!r}")
        cur = await conn.execute(
            "SELECT 1 FROM tenants WHERE tenant_id = %s FOR UPDATE", (tenant_id,)
        )
        if await cur.fetchone() is None:
            raise NotFound(f"unknown tenant {tenant_id!r}")
        await conn.execute(
            "UPDATE subscriptions SET is_current = false, updated_at = %s"
            " WHERE tenant_id = %s AND is_current",
            (now, tenant_id),
        )
        await conn.execute(
            "INSERT INTO subscriptions (tenant_id, subscription_id, plan_id, status, is_current,"
            " current_period_start, billing_cycle_anchor, trial_start, trial_end, past_due_since,"
            " created_at, updated_at) VALUES (%s, %s, %s, %s, true, %s, %s, %s, %s, %s, %s, %s)",
            (
                tenant_id,
                subscription_id,
                plan_id,
                status.value,
                now,
                anchor or now,
                now if trial_end else None,
                trial_end,
                past_due_since,
                now,
                now,
            ),
        )
        await apply_plan_grant(conn, tenant_id, plan_id, "start", f"{subscription_id}:start", now)
    return subscription_id


async def apply_plan_grant(
    conn: Conn, tenant_id: str, plan_id: str, on: str, key: str, now: datetime
) -> bool:
    """Credit the plan's `on` grant once per key (subscription + period + kind)."""
    cur = await conn.execute(
        "SELECT amount_micros, expires_after_days FROM plan_wallet_grants"
        " WHERE plan_id = %s AND grant_on = %s",
        (plan_id, on),
    )
    row = await cur.fetchone()
    if row is None:
        return False
    amount, days = row
    return await store.add_grant(
        conn,
        tenant_id,
        grant_id=new_id("grant", now),
        grant_key=f"plan:{key}",
        source=on,
        amount_micros=amount,
        expires_at=now + timedelta(days=days) if days else None,
        reason=f"plan {plan_id} {on} grant",
        now=now,
    )


async def grant_credits(
    conn: Conn,
    tenant_id: str,
    amount_micros: int,
    now: datetime,
    *,
    reason: str,
    expires_at: datetime | None = None,
    key: str | None = None,
) -> str:
    if amount_micros <= 0:
        raise InvalidRequest("amount_micros must be > 0")
    grant_id = new_id("grant", now)
    async with conn.transaction():
        await store.add_grant(
            conn,
            tenant_id,
            grant_id=grant_id,
            grant_key=key or f"manual:{grant_id}",
            source="manual",
            amount_micros=amount_micros,
            expires_at=expires_at,
            reason=reason,
            now=now,
        )
    return grant_id


async def set_overrides(conn: Conn, tenant_id: str, quotas: Sequence[Quota]) -> None:
    """Replace the tenant's overrides with `quotas` (enterprise plans only apply them)."""
    PlanSpec("overrides", 0, tuple(quotas)).validate()
    async with conn.transaction():
        await conn.execute("DELETE FROM quota_overrides WHERE tenant_id = %s", (tenant_id,))
        for q in quotas:
            await conn.execute(
                'INSERT INTO quota_overrides (tenant_id, resource, period, "limit", warn_at,'
                " overage) VALUES (%s, %s, %s, %s, %s, %s)",
                (tenant_id, q.resource, q.period.value, q.limit, list(q.warn_at), q.overage.value),
            )


async def set_model_price(
    conn: Conn,
    provider: str,
    model: str,
    input_micros_per_million: int,
    output_micros_per_million: int,
    effective_from: datetime,
) -> None:
    if input_micros_per_million < 0 or output_micros_per_million < 0:
        raise InvalidRequest("prices must be >= 0")
    await conn.execute(
        "INSERT INTO model_prices (provider, model, effective_from, input_micros_per_million,"
        " output_micros_per_million) VALUES (%s, %s, %s, %s, %s)"
        " ON CONFLICT (provider, model, effective_from) DO UPDATE SET"
        " input_micros_per_million = EXCLUDED.input_micros_per_million,"
        " output_micros_per_million = EXCLUDED.output_micros_per_million",
        (provider, model, effective_from, input_micros_per_million, output_micros_per_million),
    )


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
