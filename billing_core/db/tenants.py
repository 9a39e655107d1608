"""Tenants, their subscriptions (one current at most) and their quota overrides."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg import errors as pg_errors

from billing_core.billing.model import CurrentSubscription, TenantView
from billing_core.errors import Conflict
from billing_core.rules.limits import Quota
from billing_core.rules.resources import Overage, Period

_TENANT_COLUMNS = "tenant_id, name, email, timezone, trial_used_at, created_at"


@dataclass(frozen=True, slots=True)
class SubscriptionRow:
    """A subscription as written (assigned by an operator, or as the provider holds it)."""

    plan_id: str
    status: str
    is_current: bool
    current_period_start: datetime | None = None
    current_period_end: datetime | None = None
    billing_cycle_anchor: datetime | None = None
    trial_start: datetime | None = None
    trial_end: datetime | None = None
    cancel_at_period_end: bool = False
    past_due_since: datetime | None = None
    canceled_at: datetime | None = None
    stripe_customer_id: str | None = None
    stripe_subscription_id: str | None = None


class TenantRepository:
    def __init__(self, conn: AsyncConnection[Any]) -> None:
        self._conn = conn

    # --- tenants -----------------------------------------------------------------------

    async def get(self, tenant_id: str, *, lock: bool = False) -> TenantView | None:
        sql = f"SELECT {_TENANT_COLUMNS} FROM tenants WHERE tenant_id = %s"
        cur = await self._conn.execute(sql + (" FOR UPDATE" if lock else ""), (tenant_id,))
        row = await cur.fetchone()
        return None if row is None else TenantView(*row)

    async def page(self, *, after: str | None, limit: int) -> list[TenantView]:
        cur = await self._conn.execute(
            f"SELECT {_TENANT_COLUMNS} FROM tenants"
            " WHERE (%(after)s::text IS NULL OR tenant_id > %(after)s)"
            " ORDER BY tenant_id LIMIT %(n)s",
            {"after": after, "n": limit},
        )
        return [TenantView(*row) for row in await cur.fetchall()]

    async def search(self, text: str, *, after: str | None, limit: int) -> list[TenantView]:
        """Tenants whose id, name or email contains `text` (any case), by id."""
        pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        cur = await self._conn.execute(
            f"SELECT {_TENANT_COLUMNS} FROM tenants"
            " WHERE (tenant_id ILIKE %(p)s OR name ILIKE %(p)s OR email ILIKE %(p)s)"
            " AND (%(after)s::text IS NULL OR tenant_id > %(after)s)"
            " ORDER BY tenant_id LIMIT %(n)s",
            {"p": pattern, "after": after, "n": limit},
        )
        return [TenantView(*row) for row in await cur.fetchall()]

    async def insert(
        self, tenant_id: str, name: str, email: str, timezone: str, now: datetime
    ) -> None:
        try:
            async with self._conn.transaction():
                await self._conn.execute(
                    "INSERT INTO tenants (tenant_id, name, email, timezone, created_at)"
                    " VALUES (%s, %s, %s, %s, %s)",
                    (tenant_id, name, email, timezone, now),
                )
        except pg_errors.UniqueViolation as exc:
            raise Conflict(f"tenant {tenant_id!r} exists") from exc

    async def mark_trial_used(self, tenant_id: str, at: datetime) -> None:
        """Record the tenant's one trial (the first date stays)."""
        await self._conn.execute(
            "UPDATE tenants SET trial_used_at = coalesce(trial_used_at, %s) WHERE tenant_id = %s",
            (at, tenant_id),
        )

    async def billing_contact(self, tenant_id: str) -> tuple[str | None, str, str]:
        """(provider customer id, email, name), the tenant locked."""
        cur = await self._conn.execute(
            "SELECT stripe_customer_id, email, name FROM tenants WHERE tenant_id = %s FOR UPDATE",
            (tenant_id,),
        )
        row = await cur.fetchone()
        assert row is not None, "the caller checked that the tenant exists"
        return row[0], row[1], row[2]

    async def provider_customer(self, tenant_id: str) -> str | None:
        cur = await self._conn.execute(
            "SELECT stripe_customer_id FROM tenants WHERE tenant_id = %s", (tenant_id,)
        )
        row = await cur.fetchone()
        return None if row is None or not row[0] else str(row[0])

    async def set_provider_customer(self, tenant_id: str, customer_id: str) -> None:
        await self._conn.execute(
            "UPDATE tenants SET stripe_customer_id = %s WHERE tenant_id = %s",
            (customer_id, tenant_id),
        )
        await self._claim_customer(tenant_id, customer_id)

    async def by_provider_customer(self, customer_id: str) -> str | None:
        cur = await self._conn.execute(
            "SELECT tenant_id FROM provider_customers WHERE stripe_customer_id = %s",
            (customer_id,),
        )
        row = await cur.fetchone()
        return None if row is None else str(row[0])

    async def link_provider_customer(self, tenant_id: str, customer_id: str | None) -> str | None:
        """Link the customer to the tenant unless it has one; the tenant's customer after
        (None when the tenant does not exist or has none)."""
        cur = await self._conn.execute(
            "UPDATE tenants SET stripe_customer_id = coalesce(stripe_customer_id, %s)"
            " WHERE tenant_id = %s RETURNING coalesce(stripe_customer_id, '')",
            (customer_id, tenant_id),
        )
        row = await cur.fetchone()
        if row is None:
            return None
        linked = str(row[0])
        if linked and linked == customer_id:
            await self._claim_customer(tenant_id, linked)
        return linked

    async def _claim_customer(self, tenant_id: str, customer_id: str) -> None:
        """The customer belongs to the tenant from now on; one of another tenant is a
        Conflict (the provider's customer ids are unique across tenants)."""
        cur = await self._conn.execute(
            "INSERT INTO provider_customers (stripe_customer_id, tenant_id) VALUES (%s, %s)"
            " ON CONFLICT (stripe_customer_id) DO UPDATE"
            " SET tenant_id = provider_customers.tenant_id RETURNING tenant_id",
            (customer_id, tenant_id),
        )
        row = await cur.fetchone()
        if row is not None and row[0] != tenant_id:
            raise Conflict(
                f"the payment provider's customer {customer_id!r} belongs to another tenant"
            )

    async def exists(self, tenant_id: str) -> bool:
        cur = await self._conn.execute("SELECT 1 FROM tenants WHERE tenant_id = %s", (tenant_id,))
        return await cur.fetchone() is not None

    # --- subscriptions ---------------------------------------------------------------

    async def current_subscription(self, tenant_id: str) -> CurrentSubscription | None:
        cur = await self._conn.execute(
            "SELECT s.subscription_id, s.plan_id, p.name, p.price_cents, s.status, s.trial_end,"
            " s.current_period_start, s.current_period_end, s.cancel_at_period_end,"
            " s.stripe_customer_id, s.stripe_subscription_id, s.past_due_since, p.enterprise"
            " FROM subscriptions s JOIN plans p USING (plan_id)"
            " WHERE s.tenant_id = %s AND s.is_current",
            (tenant_id,),
        )
        row = await cur.fetchone()
        return None if row is None else CurrentSubscription(*row)

    async def end_current(self, tenant_id: str, now: datetime, *, keep: str | None = None) -> None:
        """The current subscription stops being current (unless it is the provider's
        subscription `keep`)."""
        await self._conn.execute(
            "UPDATE subscriptions SET is_current = false, updated_at = %s"
            " WHERE tenant_id = %s AND is_current"
            " AND (%s::text IS NULL OR stripe_subscription_id IS DISTINCT FROM %s)",
            (now, tenant_id, keep, keep),
        )

    async def insert_subscription(
        self, tenant_id: str, subscription_id: str, row: SubscriptionRow, now: datetime
    ) -> None:
        await self._conn.execute(
            "INSERT INTO subscriptions (tenant_id, subscription_id, plan_id, status, is_current,"
            " current_period_start, current_period_end, billing_cycle_anchor, trial_start,"
            " trial_end, cancel_at_period_end, past_due_since, canceled_at, stripe_customer_id,"
            " stripe_subscription_id, created_at, updated_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (tenant_id, subscription_id, *_row_values(row), now, now),
        )

    async def by_provider_subscription(
        self, tenant_id: str, stripe_subscription_id: str
    ) -> tuple[str, datetime | None] | None:
        """(subscription_id, past_due_since) of our row for the provider's subscription."""
        cur = await self._conn.execute(
            "SELECT subscription_id, past_due_since FROM subscriptions"
            " WHERE tenant_id = %s AND stripe_subscription_id = %s",
            (tenant_id, stripe_subscription_id),
        )
        row = await cur.fetchone()
        return None if row is None else (str(row[0]), row[1])

    async def update_subscription(
        self, tenant_id: str, subscription_id: str, row: SubscriptionRow, now: datetime
    ) -> None:
        """Write the row's values; it becomes current when `row.is_current`, and stays
        current if it was."""
        await self._conn.execute(
            "UPDATE subscriptions SET plan_id = %s, status = %s,"
            " is_current = is_current OR %s, current_period_start = %s,"
            " current_period_end = %s, billing_cycle_anchor = %s, trial_start = %s,"
            " trial_end = %s, cancel_at_period_end = %s, past_due_since = %s, canceled_at = %s,"
            " stripe_customer_id = %s, stripe_subscription_id = %s, updated_at = %s"
            " WHERE tenant_id = %s AND subscription_id = %s",
            (*_row_values(row), now, tenant_id, subscription_id),
        )

    async def expire_trials(self, now: datetime) -> list[tuple[str, str]]:
        """Our own (card-less) trials past their end become trial_expired; (tenant_id,
        subscription_id) of each."""
        cur = await self._conn.execute(
            "UPDATE subscriptions SET status = 'trial_expired', updated_at = %s"
            " WHERE is_current AND status = 'trialing' AND trial_end <= %s"
            " AND stripe_subscription_id IS NULL RETURNING tenant_id, subscription_id",
            (now, now),
        )
        return [(str(r[0]), str(r[1])) for r in await cur.fetchall()]

    # --- overrides -------------------------------------------------------------------

    async def overrides(self, tenant_id: str) -> tuple[Quota, ...]:
        cur = await self._conn.execute(
            'SELECT resource, period, "limit", warn_at, overage FROM quota_overrides'
            " WHERE tenant_id = %s ORDER BY resource, period",
            (tenant_id,),
        )
        return tuple(
            Quota(res, Period(period), limit, tuple(warn_at), Overage(overage))
            for res, period, limit, warn_at, overage in await cur.fetchall()
        )

    async def replace_overrides(self, tenant_id: str, quotas: Sequence[Quota]) -> None:
        await self._conn.execute("DELETE FROM quota_overrides WHERE tenant_id = %s", (tenant_id,))
        for q in quotas:
            await self._conn.execute(
                'INSERT INTO quota_overrides (tenant_id, resource, period, "limit", warn_at,'
                " overage) VALUES (%s, %s, %s, %s, %s, %s)",
                (tenant_id, q.resource, q.period.value, q.limit, list(q.warn_at), q.overage.value),
            )


def _row_values(row: SubscriptionRow) -> tuple[Any, ...]:
    return (
        row.plan_id, row.status, row.is_current, row.current_period_start,
        row.current_period_end, row.billing_cycle_anchor, row.trial_start, row.trial_end,
        row.cancel_at_period_end, row.past_due_since, row.canceled_at, row.stripe_customer_id,
        row.stripe_subscription_id,
    )  # fmt: skip
