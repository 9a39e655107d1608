"""The bench's databases: the plans, prices and tenants of every scenario, the historic
records, vacuuming between steps, and the books checked at the end (counters against
records, wallet against ledger)."""

from __future__ import annotations

import contextlib
import time
from datetime import UTC, datetime
from typing import Any

import psycopg

from billing_core.billing.model import PlanSpec, PriceView, quota
from billing_core.billing.plans import create_plan
from billing_core.billing.prices import set_price
from billing_core.billing.subscriptions import subscribe
from billing_core.billing.tenants import create_tenant
from billing_core.billing.wallet import credit
from billing_core.db.pool import open_pool
from billing_core.db.unit_of_work import Database

HOT = "bench-hot"


async def seed(database_url: str, tenants: int) -> None:
    """Plans, prices and tenants for every scenario (once)."""
    now = datetime.now(UTC)
    db = await Database.open(database_url, 2)
    try:
        async with db.transaction() as uow:
            await set_price(uow, "bench", PriceView("bench", "bench-model", now, 1_000_000, 0), now)
            hot = await create_plan(
                uow,
                "bench",
                PlanSpec(
                    name="bench-hot",
                    price_cents=1000,
                    quotas=(
                        # the daily window runs out at once: from then on the wallet pays
                        quota("tokens", "daily", 1000, overage="wallet"),
                        quota("tokens", "monthly", 10**12),
                    ),
                ),
                now,
            )
            wide = await create_plan(
                uow,
                "bench",
                PlanSpec(name="bench-wide", price_cents=500,
                         quotas=(quota("messages", "daily", 10**12),
                                 quota("messages", "monthly", 10**12))),
                now,
            )  # fmt: skip
            await create_tenant(uow, "bench", HOT, "hot", now)
            await subscribe(uow, "bench", HOT, hot.plan_id, now)
            await credit(uow, HOT, 10**15, now, reason="bench")
        async with db.pool.connection() as conn:
            # ten thousand tenants at once: straight into their tables
            await conn.execute(
                "INSERT INTO tenants (tenant_id, name, timezone, created_at)"
                " SELECT 'bench-' || lpad(i::text, 5, '0'), 'bench', 'UTC', %s"
                " FROM generate_series(0, %s - 1) i",
                (now, tenants),
            )
            await conn.execute(
                "INSERT INTO subscriptions (tenant_id, subscription_id, plan_id, status,"
                " is_current, billing_cycle_anchor, created_at, updated_at)"
                " SELECT 'bench-' || lpad(i::text, 5, '0'), 'sub-bench-' || i, %s, 'active',"
                " true, %s, %s, %s FROM generate_series(0, %s - 1) i",
                (wide.plan_id, now, now, now, tenants),
            )
    finally:
        await db.close()


async def wide_plan_id(conn: psycopg.AsyncConnection[Any]) -> str:
    """The plan of the ten thousand tenants (no payment, one wide messages quota)."""
    cur = await conn.execute("SELECT plan_id FROM plans WHERE name = 'bench-wide'")
    row = await cur.fetchone()
    assert row is not None, "seed() first"
    return str(row[0])


def vacuum(database_url: str) -> None:
    """Leave no cleanup of the previous step to run during the next measurement: dead rows
    vacuumed, statistics fresh, dirty pages written (CHECKPOINT needs a superuser or the
    pg_checkpoint role; without it the checkpointer catches up on its own)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE)")
        with contextlib.suppress(psycopg.errors.InsufficientPrivilege):
            conn.execute("CHECKPOINT")


async def add_history(database_url: str, rows: int) -> float:
    """`rows` historic usage records (a year back, across the tenants); returns seconds."""
    started = time.monotonic()
    pool = await open_pool(database_url, 1)
    try:
        async with pool.connection() as conn:
            await conn.execute(
                "INSERT INTO usage_records (tenant_id, usage_record_id, resource, amount, kind,"
                " request_id, cost_micros, occurred_at)"
                " SELECT CASE WHEN i %% 10 = 0 THEN %s"
                "        ELSE 'bench-' || lpad((i %% 10000)::text, 5, '0') END,"
                " 'ur_hist_' || i, 'tokens', 1 + i %% 100, 'consume', 'h' || i, i %% 1000,"
                " now() - interval '400 days' + i * interval '5 seconds'"
                " FROM generate_series(1, %s) i",
                (HOT, rows),
            )
            await conn.execute("ANALYZE usage_records")
    finally:
        await pool.close()
    return time.monotonic() - started


async def check_books(database_url: str, since: datetime) -> dict[str, int]:
    """Zero overshoot, zero lost, zero double-counted: counters against the records."""
    pool = await open_pool(database_url, 1)
    try:
        async with pool.connection() as conn:
            cur = await conn.execute(
                """
                SELECT count(*) FILTER (WHERE c.used <> coalesce(r.total, 0)),
                       count(*) FILTER (WHERE c.period = 'daily' AND c.resource = 'messages'
                                        AND c.used > 1000000000000)
                FROM usage_counters c
                LEFT JOIN LATERAL (
                    SELECT sum(amount) AS total FROM usage_records r
                    WHERE r.tenant_id = c.tenant_id AND r.resource = c.resource
                      AND r.occurred_at >= c.window_start AND r.occurred_at >= %s
                      AND r.usage_record_id NOT LIKE 'ur_hist_%%'
                      AND r.occurred_at < c.window_start + CASE c.period
                          WHEN 'daily' THEN interval '1 day' ELSE interval '1 month' END
                ) r ON true
                WHERE c.tenant_id LIKE 'bench-%%'
                """,
                (since,),
            )
            row = await cur.fetchone()
            assert row is not None
            cur = await conn.execute(
                "SELECT balance_micros - (SELECT sum(delta_micros) FROM wallet_ledger"
                " WHERE tenant_id = %s) FROM wallets WHERE tenant_id = %s",
                (HOT, HOT),
            )
            wallet = await cur.fetchone()
    finally:
        await pool.close()
    return {
        "windows_not_matching_records": int(row[0]),
        "windows_over_limit": int(row[1]),
        "wallet_off_ledger_micros": int(wallet[0]) if wallet and wallet[0] is not None else 0,
    }
