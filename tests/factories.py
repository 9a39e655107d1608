"""Test data through the catalogue use cases (the same path the API and seed use)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from psycopg_pool import AsyncConnectionPool

from billing_core import catalog
from billing_core.catalog import GrantSpec, PlanSpec
from billing_core.limits import Quota, SubscriptionStatus


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
    async with pool.connection() as conn:
        return await catalog.create_plan(
            conn,
            PlanSpec(
                name=f"{name}-{uid}",
                price_cents=price_cents,
                quotas=tuple(quotas),
                unlimited=unlimited,
                enterprise=enterprise,
                wallet_grants=tuple(grants),
            ),
            now,
        )


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
    async with pool.connection() as conn:
        await catalog.create_tenant(conn, tenant_id, f"Tenant {tenant_id}", now, timezone=timezone)
        if plan_id is not None:
            await catalog.assign_plan(
                conn,
                tenant_id,
                plan_id,
                now,
                status=status,
                trial_end=trial_end,
                past_due_since=past_due_since,
            )
        if credits_micros:
            await catalog.grant_credits(conn, tenant_id, credits_micros, now, reason="test")
    return tenant_id


async def price(
    pool: AsyncConnectionPool[Any], provider: str, model: str, inp: int, out: int, at: datetime
) -> None:
    async with pool.connection() as conn:
        await catalog.set_model_price(conn, provider, model, inp, out, at)


async def fetch(pool: AsyncConnectionPool[Any], sql: str, *args: Any) -> list[tuple[Any, ...]]:
    async with pool.connection() as conn:
        cur = await conn.execute(sql, args)
        return list(await cur.fetchall())
