"""Test data through the billing use cases (the same path the API and the seed use), and a
quota engine on a test pool."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from psycopg_pool import AsyncConnectionPool

from billing_core.billing import plans, prices, subscriptions, tenants, wallet
from billing_core.billing.model import GrantSpec, PlanSpec, PriceView
from billing_core.clock import Clock
from billing_core.db.quota_store import PgQuotaStore
from billing_core.db.unit_of_work import Database
from billing_core.quota.engine import QuotaEngine, QuotaRules
from billing_core.rules.limits import Quota, SubscriptionStatus

ACTOR = "tests"


def engine(
    pool: AsyncConnectionPool[Any],
    clock: Clock,
    rules: QuotaRules | None = None,
    *,
    batch_pool: AsyncConnectionPool[Any] | None = None,
    acquire_timeout_s: float = 2.0,
    generic_plans: bool = True,
) -> QuotaEngine:
    store = PgQuotaStore(
        pool,
        batch_pool=batch_pool,
        acquire_timeout_s=acquire_timeout_s,
        generic_plans=generic_plans,
    )
    return QuotaEngine(store, clock, rules or QuotaRules())


async def plan(
    pool: AsyncConnectionPool[Any],
    now: datetime,
    uid: str,
    quotas: Sequence[Quota],
    *,
    price_cents: int = 1000,
    name: str = "plan",
    unlimited: bool = False,
    enterprise: bool = False,
    grants: Sequence[GrantSpec] = (),
) -> str:
    spec = PlanSpec(
        name=f"{name}-{uid}",
        price_cents=price_cents,
        quotas=tuple(quotas),
        unlimited=unlimited,
        enterprise=enterprise,
        wallet_grants=tuple(grants),
    )
    async with Database(pool).transaction() as uow:
        return (await plans.create_plan(uow, ACTOR, spec, now)).plan_id


async def tenant(
    pool: AsyncConnectionPool[Any],
    now: datetime,
    tenant_id: str,
    plan_id: str | None,
    *,
    timezone: str = "UTC",
    status: SubscriptionStatus = SubscriptionStatus.ACTIVE,
    trial_end: datetime | None = None,
    past_due_since: datetime | None = None,
    credits_micros: int = 0,
) -> str:
    async with Database(pool).transaction() as uow:
        name = f"Tenant {tenant_id}"
        await tenants.create_tenant(uow, ACTOR, tenant_id, name, now, timezone=timezone)
        if plan_id is not None:
            await subscriptions.subscribe(
                uow, ACTOR, tenant_id, plan_id, now, status=status, trial_end=trial_end,
                past_due_since=past_due_since,
            )  # fmt: skip
        if credits_micros:
            await wallet.credit(uow, tenant_id, credits_micros, now, reason="test")
    return tenant_id


async def subscribe(
    pool: AsyncConnectionPool[Any], tenant_id: str, plan_id: str, now: datetime
) -> None:
    """Put the tenant on another plan (active)."""
    async with Database(pool).transaction() as uow:
        await subscriptions.subscribe(uow, ACTOR, tenant_id, plan_id, now)


async def credit(
    pool: AsyncConnectionPool[Any],
    tenant_id: str,
    amount_micros: int,
    now: datetime,
    *,
    reason: str = "test",
    expires_at: datetime | None = None,
) -> str:
    async with Database(pool).transaction() as uow:
        return await wallet.credit(
            uow, tenant_id, amount_micros, now, reason=reason, expires_at=expires_at
        )


async def price(
    pool: AsyncConnectionPool[Any], provider: str, model: str, inp: int, out: int, at: datetime
) -> None:
    async with Database(pool).transaction() as uow:
        await prices.set_price(uow, ACTOR, PriceView(provider, model, at, inp, out), at)


async def fetch(pool: AsyncConnectionPool[Any], sql: str, *args: Any) -> list[tuple[Any, ...]]:
    async with pool.connection() as conn:
        cur = await conn.execute(sql, args)
        return list(await cur.fetchall())
