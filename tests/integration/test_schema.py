"""The migrations and the models agree, and the database enforces the schema's rules."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from psycopg_pool import AsyncConnectionPool
from sqlalchemy import create_engine

from billing_core.billing.model import quota
from billing_core.db.migrate import current_revision, head_revision
from billing_core.db.models import APPEND_ONLY_TABLES, Base
from billing_core.db.urls import sqlalchemy_url
from billing_core.rules.limits import SubscriptionStatus
from tests import factories as f

NOW = datetime(2026, 3, 10, tzinfo=UTC)


def test_autogenerate_finds_no_difference_between_models_and_migrations(
    database_url: str,
) -> None:
    engine = create_engine(sqlalchemy_url(database_url))
    try:
        with engine.connect() as conn:
            diff = compare_metadata(
                MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata
            )
    finally:
        engine.dispose()
    assert diff == []
    assert current_revision(database_url) == head_revision()


ROW_OF = {
    "usage_records": "INSERT INTO usage_records (tenant_id, usage_record_id, resource, amount,"
    " kind, occurred_at) VALUES (%s, 'ur_x', 'messages', 1, 'consume', now())",
    "audit_log": "INSERT INTO audit_log (actor, action, entity_type, entity_id)"
    " VALUES ('test', 'create', 'tenant', %s)",
    "wallet_ledger": None,  # written by the credit grant of the tenant below
}


@pytest.mark.parametrize("table", APPEND_ONLY_TABLES)
@pytest.mark.parametrize("verb", ["UPDATE", "DELETE", "TRUNCATE"])
async def test_append_only_tables_reject_update_delete_truncate(
    pool: AsyncConnectionPool[Any], uid: str, table: str, verb: str
) -> None:
    assert set(ROW_OF) == set(APPEND_ONLY_TABLES)
    plan = await f.plan(pool, NOW, uid, [quota("messages", "daily", 5)])
    t = await f.tenant(pool, NOW, f"t-{uid}", plan, credits_micros=100)
    key = "entity_id" if table == "audit_log" else "tenant_id"
    statement = {
        "UPDATE": f"UPDATE {table} SET {key} = {key} WHERE {key} = %s",
        "DELETE": f"DELETE FROM {table} WHERE {key} = %s",
        "TRUNCATE": f"TRUNCATE {table} CASCADE",
    }[verb]
    async with pool.connection() as conn:
        if ROW_OF[table]:
            await conn.execute(ROW_OF[table], (t,))
        before = await f.fetch(pool, f"SELECT count(*) FROM {table} WHERE {key} = %s", t)
        with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
            await conn.execute(statement, () if verb == "TRUNCATE" else (t,))
    assert await f.fetch(pool, f"SELECT count(*) FROM {table} WHERE {key} = %s", t) == before
    assert before[0][0] > 0


async def test_database_allows_one_current_subscription_per_tenant(
    pool: AsyncConnectionPool[Any], uid: str
) -> None:
    plan = await f.plan(pool, NOW, uid, [quota("messages", "daily", 5)])
    t = await f.tenant(pool, NOW, f"t-{uid}", plan, status=SubscriptionStatus.ACTIVE)
    async with pool.connection() as conn:
        with pytest.raises(psycopg.errors.UniqueViolation, match="one_current"):
            await conn.execute(
                "INSERT INTO subscriptions (tenant_id, subscription_id, plan_id, status,"
                " is_current, billing_cycle_anchor) VALUES (%s, 'sub_2', %s, 'active', true,"
                " now())",
                (t, plan),
            )
    rows = await f.fetch(pool, "SELECT count(*) FROM subscriptions WHERE tenant_id = %s", t)
    assert rows == [(1,)]


@pytest.mark.parametrize(
    ("sql", "error"),
    [
        (
            'INSERT INTO plan_quotas (plan_id, resource, period, "limit") '
            "VALUES ('{p}', 'gold', 'daily', 1)",
            "resource_known",
        ),
        (
            'INSERT INTO plan_quotas (plan_id, resource, period, "limit") '
            "VALUES ('{p}', 'tokens', 'hourly', 1)",
            "period_known",
        ),
        (
            'INSERT INTO plan_quotas (plan_id, resource, period, "limit") '
            "VALUES ('{p}', 'custom:x', 'daily', -1)",
            "limit_nonnegative",
        ),
        (
            "UPDATE plans SET trial = true, trial_days = 0 WHERE plan_id = '{p}'",
            "trial_days_positive",
        ),
    ],
    ids=["unknown-resource", "unknown-period", "negative-limit", "trial-without-days"],
)
async def test_check_constraints(
    pool: AsyncConnectionPool[Any], uid: str, sql: str, error: str
) -> None:
    plan = await f.plan(pool, NOW, uid, [])
    async with pool.connection() as conn:
        with pytest.raises(psycopg.errors.CheckViolation, match=error):
            await conn.execute(sql.format(p=plan))
