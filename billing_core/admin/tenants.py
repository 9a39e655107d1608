"""Tenants, their current subscription (with an explanation), trials and overrides."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from billing_core import catalog
from billing_core.admin import audit
from billing_core.admin.pages import Page, check_limit, decode_cursor, page_of
from billing_core.admin.plans import get_plan
from billing_core.db.quota_store import Conn
from billing_core.errors import Conflict, NotFound
from billing_core.explain import explain_subscription
from billing_core.limits import Quota, SubscriptionStatus
from billing_core.resources import Overage, Period

_TENANT_COLUMNS = "tenant_id, name, email, timezone, trial_used_at, created_at"
# a subscription on a paid plan in one of these states is something a trial must not replace
_LIVE = ("trialing", "active", "past_due", "unpaid", "incomplete")


@dataclass(frozen=True, slots=True)
class TenantView:
    tenant_id: str
    name: str
    email: str
    timezone: str
    trial_used_at: datetime | None
    created_at: datetime


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


async def get_tenant(conn: Conn, tenant_id: str, *, lock: bool = False) -> TenantView:
    sql = f"SELECT {_TENANT_COLUMNS} FROM tenants WHERE tenant_id = %s"
    cur = await conn.execute(sql + (" FOR UPDATE" if lock else ""), (tenant_id,))
    row = await cur.fetchone()
    if row is None:
        raise NotFound(f"unknown tenant {tenant_id!r}")
    return TenantView(*row)


async def list_tenants(conn: Conn, *, limit: int, cursor: str | None) -> Page[TenantView]:
    check_limit(limit)
    after = decode_cursor(cursor, 1)
    cur = await conn.execute(
        f"SELECT {_TENANT_COLUMNS} FROM tenants"
        " WHERE (%(after)s::text IS NULL OR tenant_id > %(after)s) ORDER BY tenant_id LIMIT %(n)s",
        {"after": after[0] if after else None, "n": limit + 1},
    )
    rows = [TenantView(*row) for row in await cur.fetchall()]
    return page_of(rows, limit, lambda t: [t.tenant_id])


async def create_tenant(
    conn: Conn,
    actor: str,
    tenant_id: str,
    name: str,
    now: datetime,
    *,
    email: str = "",
    timezone: str = "UTC",
) -> TenantView:
    async with conn.transaction():
        await catalog.create_tenant(conn, tenant_id, name, now, email=email, timezone=timezone)
        view = await get_tenant(conn, tenant_id)
        await audit.record_tenant(conn, actor, "tenant.create", tenant_id, None, view, now)
    return view


async def get_subscription(
    conn: Conn, tenant_id: str, now: datetime, grace: timedelta
) -> SubscriptionView:
    await get_tenant(conn, tenant_id)
    cur = await conn.execute(
        "SELECT s.subscription_id, s.plan_id, p.name, p.price_cents, s.status, s.trial_end,"
        " s.current_period_start, s.current_period_end, s.cancel_at_period_end,"
        " s.stripe_customer_id, s.stripe_subscription_id, s.past_due_since"
        " FROM subscriptions s JOIN plans p USING (plan_id)"
        " WHERE s.tenant_id = %s AND s.is_current",
        (tenant_id,),
    )
    row = await cur.fetchone()
    if row is None:
        explanation = explain_subscription(status=None, plan_name="", price_cents=0, now=now)
        return SubscriptionView(
            tenant_id, None, None, None, "none", None, None, None, False, None, None, explanation
        )
    (sub_id, plan_id, plan_name, price, status, trial_end, start, end, cancel, customer,
     stripe_sub, past_due_since) = row  # fmt: skip
    explanation = explain_subscription(
        status=SubscriptionStatus(status),
        plan_name=plan_name,
        price_cents=price,
        now=now,
        trial_end=trial_end,
        period_end=end,
        cancel_at_period_end=cancel,
        past_due_since=past_due_since,
        grace=grace,
        card_on_file=stripe_sub is not None,
    )
    return SubscriptionView(
        tenant_id,
        sub_id,
        plan_id,
        plan_name,
        status,
        trial_end,
        start,
        end,
        cancel,
        customer,
        stripe_sub,
        explanation,
    )


async def assign_plan(
    conn: Conn, actor: str, tenant_id: str, plan_id: str, now: datetime, grace: timedelta
) -> SubscriptionView:
    """Put the tenant on a plan without Stripe: enterprise/contract plans and free plans.

    Assigning the plan the tenant is already actively on changes nothing (and grants
    nothing twice), so a retried PUT is harmless.
    """
    async with conn.transaction():
        await get_tenant(conn, tenant_id, lock=True)
        plan = await get_plan(conn, plan_id)
        before = await get_subscription(conn, tenant_id, now, grace)
        if before.plan_id == plan_id and before.status == "active":
            return before
        if not plan.spec.active:
            raise Conflict(f"plan {plan_id!r} is archived and takes no new subscribers")
        if plan.spec.price_cents > 0 and not plan.spec.enterprise:
            raise Conflict(
                f"plan {plan_id!r} is paid: subscribe through checkout; only enterprise and "
                "free plans are assigned directly"
            )
        await catalog.assign_plan(conn, tenant_id, plan_id, now)
        after = await get_subscription(conn, tenant_id, now, grace)
        await audit.record_tenant(conn, actor, "subscription.assign", tenant_id, before, after, now)
    return after


async def start_trial(
    conn: Conn, actor: str, tenant_id: str, plan_id: str, now: datetime, grace: timedelta
) -> SubscriptionView:
    """One trial per tenant, ever; it replaces a free or lapsed plan, never a paid one."""
    async with conn.transaction():
        tenant = await get_tenant(conn, tenant_id, lock=True)
        if tenant.trial_used_at is not None:
            raise Conflict(
                f"tenant {tenant_id!r} already had a trial "
                f"(started {tenant.trial_used_at:%Y-%m-%d})"
            )
        plan = await get_plan(conn, plan_id)
        if not plan.spec.active or not plan.spec.trial:
            raise Conflict(f"plan {plan_id!r} offers no trial")
        before = await get_subscription(conn, tenant_id, now, grace)
        if before.plan_id is not None and before.status in _LIVE:
            current = await get_plan(conn, before.plan_id)
            if current.spec.price_cents > 0:
                raise Conflict(
                    f"tenant {tenant_id!r} is already on the paid plan {before.plan_id!r}"
                )
        await catalog.assign_plan(
            conn,
            tenant_id,
            plan_id,
            now,
            status=SubscriptionStatus.TRIALING,
            trial_end=now + timedelta(days=plan.spec.trial_days),
        )
        await conn.execute(
            "UPDATE tenants SET trial_used_at = %s WHERE tenant_id = %s", (now, tenant_id)
        )
        after = await get_subscription(conn, tenant_id, now, grace)
        await audit.record_tenant(conn, actor, "subscription.trial", tenant_id, before, after, now)
    return after


async def get_overrides(conn: Conn, tenant_id: str) -> tuple[Quota, ...]:
    await get_tenant(conn, tenant_id)
    cur = await conn.execute(
        'SELECT resource, period, "limit", warn_at, overage FROM quota_overrides'
        " WHERE tenant_id = %s ORDER BY resource, period",
        (tenant_id,),
    )
    return tuple(
        Quota(res, Period(period), limit, tuple(warn_at), Overage(overage))
        for res, period, limit, warn_at, overage in await cur.fetchall()
    )


async def set_overrides(
    conn: Conn, actor: str, tenant_id: str, quotas: Sequence[Quota], now: datetime
) -> tuple[Quota, ...]:
    """Replace the tenant's overrides; they apply only while the tenant is on an
    enterprise plan, so setting them for anyone else is refused rather than ignored."""
    async with conn.transaction():
        await get_tenant(conn, tenant_id, lock=True)
        cur = await conn.execute(
            "SELECT p.enterprise FROM subscriptions s JOIN plans p USING (plan_id)"
            " WHERE s.tenant_id = %s AND s.is_current",
            (tenant_id,),
        )
        row = await cur.fetchone()
        if quotas and (row is None or not row[0]):
            raise Conflict(
                f"tenant {tenant_id!r} is not on an enterprise plan; overrides would not apply"
            )
        before = await get_overrides(conn, tenant_id)
        await catalog.set_overrides(conn, tenant_id, quotas)
        after = await get_overrides(conn, tenant_id)
        await audit.record_tenant(
            conn, actor, "overrides.set", tenant_id, {"quotas": before}, {"quotas": after}, now
        )
    return after
