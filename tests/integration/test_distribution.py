"""The schema is ready to be distributed by tenant (Citus, docs/scaling.md), proven here
without Citus: the tables are rebuilt hash-partitioned by tenant_id with PostgreSQL's own
partitioning (which refuses a unique index without the partition key, as Citus refuses a
unique constraint without the distribution column), and every statement the hot path and
the webhook processing run is explained by auto_explain (EXPLAIN ANALYZE of the statement
as it ran, sent back as a notice): each reads or writes one partition of each table — its
tenant's. The append-only triggers are left out of the partitioned copy: they change no
plan."""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from psycopg import AsyncConnection
from psycopg.errors import Diagnostic
from psycopg_pool import AsyncConnectionPool

from billing_core.billing import webhooks
from billing_core.billing.model import quota
from billing_core.clock import FrozenClock
from billing_core.db.unit_of_work import Database
from billing_core.db.urls import libpq_url
from billing_core.errors import Conflict
from billing_core.quota.answers import Decision
from billing_core.quota.engine import QuotaEngine, QuotaRules
from billing_core.quota.requests import (
    AdmitAllRequest,
    CommitRequest,
    ConsumeRequest,
    FreeRequest,
    ReleaseRequest,
    ReportRequest,
    Request,
    ReserveRequest,
    UsageRequest,
)
from billing_core.rules.pricing import TokenUsage
from control_plane.stripe_adapter import StripeBillingAdapter, event_from
from tests import factories as f
from tests.billing.conftest import EMULATOR_KEY, billing_stack, pay
from tests.billing.test_lifecycle import make_plans
from tests.conftest import fresh_database

# distributed by tenant_id, co-located: a tenant's rows of every table on one node
DISTRIBUTED = (
    "tenants",
    "subscriptions",
    "quota_overrides",
    "usage_counters",
    "usage_records",
    "usage_daily",
    "usage_daily_marks",
    "reservations",
    "idempotency_keys",
    "wallets",
    "wallet_grants",
    "wallet_ledger",
    "notifications",
)
# small, read everywhere, changed by operators: a copy on every node
REFERENCE = (
    "plans",
    "plan_stripe_prices",
    "plan_quotas",
    "plan_wallet_grants",
    "model_prices",
    "api_keys",
)
# keyed by something else than a tenant, each looked up by its own key
OWN_KEY = {
    "provider_customers": "stripe_customer_id",
    "stripe_webhook_events": "event_id",
    "http_idempotency_keys": "api_key_id",
    "audit_log": "audit_id",
}
LOCAL = ("alembic_version",)
PARTITIONS = 4
PARTITION = re.compile(r"^(\w+)_p(\d+)$")
NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)


async def _tables(conn: AsyncConnection[Any]) -> dict[str, set[str]]:
    cur = await conn.execute(
        "SELECT table_name, array_agg(column_name::text) FROM information_schema.columns"
        " WHERE table_schema = 'public' AND table_name IN (SELECT tablename FROM pg_tables"
        " WHERE schemaname = 'public') GROUP BY table_name"
    )
    return {name: set(columns) for name, columns in await cur.fetchall()}


async def test_every_table_is_classified_and_every_unique_index_holds_its_key(
    database_url: str,
) -> None:
    """A new table must be placed (docs/scaling.md), and its unique indexes allow it."""
    async with await AsyncConnection.connect(libpq_url(database_url)) as conn:
        tables = await _tables(conn)
        assert set(tables) == {*DISTRIBUTED, *REFERENCE, *OWN_KEY, *LOCAL}
        cur = await conn.execute(
            "SELECT t.relname, i.relname, array_agg(a.attname::text) FROM pg_index x"
            " JOIN pg_class t ON t.oid = x.indrelid JOIN pg_class i ON i.oid = x.indexrelid"
            " JOIN pg_namespace n ON n.oid = t.relnamespace"
            " JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = ANY(x.indkey)"
            " WHERE x.indisunique AND n.nspname = 'public' GROUP BY 1, 2"
        )
        unique = await cur.fetchall()
    for table, index, columns in unique:
        if table in DISTRIBUTED:
            assert "tenant_id" in columns, (table, index, columns)
        elif table in OWN_KEY:
            assert OWN_KEY[table] in columns, (table, index, columns)


async def test_a_provider_customer_belongs_to_one_tenant(pool: Any, uid: str) -> None:
    a = await f.tenant(pool, NOW, f"a-{uid}", None)
    b = await f.tenant(pool, NOW, f"b-{uid}", None)
    async with Database(pool).transaction() as uow:
        await uow.tenants.set_provider_customer(a, f"cus_{uid}")
        assert await uow.tenants.by_provider_customer(f"cus_{uid}") == a
    with pytest.raises(Conflict, match="belongs to another tenant"):
        async with Database(pool).transaction() as uow:
            await uow.tenants.set_provider_customer(b, f"cus_{uid}")
    async with Database(pool).transaction() as uow:
        assert await uow.tenants.link_provider_customer(b, f"cus_{uid}-b") == f"cus_{uid}-b"
        assert await uow.tenants.by_provider_customer(f"cus_{uid}-b") == b


async def _partition_by_tenant(url: str) -> None:
    """Rebuild every DISTRIBUTED table hash-partitioned by tenant_id, with its defaults,
    checks, indexes and foreign keys (a unique index without tenant_id fails here)."""
    async with await AsyncConnection.connect(libpq_url(url)) as conn:
        cur = await conn.execute(
            "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)"
            " FROM pg_constraint WHERE contype = 'f' AND connamespace = 'public'::regnamespace"
        )
        foreign_keys = await cur.fetchall()
        for table in DISTRIBUTED:
            await conn.execute(f"ALTER TABLE {table} RENAME TO {table}_flat")
            await conn.execute(
                f"CREATE TABLE {table} (LIKE {table}_flat INCLUDING DEFAULTS INCLUDING"
                " CONSTRAINTS INCLUDING INDEXES INCLUDING GENERATED) PARTITION BY HASH (tenant_id)"
            )
            cur = await conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = %s"
                " AND is_identity = 'YES'",
                (f"{table}_flat",),
            )
            for (column,) in await cur.fetchall():  # PostgreSQL 15: no identity on partitions
                sequence = f"{table}_{column}_by_tenant"
                await conn.execute(f"CREATE SEQUENCE {sequence}")
                await conn.execute(
                    f"ALTER TABLE {table} ALTER {column} SET DEFAULT nextval('{sequence}')"
                )
            for i in range(PARTITIONS):
                await conn.execute(
                    f"CREATE TABLE {table}_p{i} PARTITION OF {table}"
                    f" FOR VALUES WITH (MODULUS {PARTITIONS}, REMAINDER {i})"
                )
            await conn.execute(f"INSERT INTO {table} SELECT * FROM {table}_flat")
        for table in DISTRIBUTED:
            await conn.execute(f"DROP TABLE {table}_flat CASCADE")
        cur = await conn.execute(
            "SELECT conname FROM pg_constraint WHERE contype = 'f'"
            " AND connamespace = 'public'::regnamespace"
        )
        kept = {name for (name,) in await cur.fetchall()}
        for table, name, definition in foreign_keys:  # those the drops took along
            if name not in kept:
                await conn.execute(f"ALTER TABLE {table} ADD CONSTRAINT {name} {definition}")
        await conn.commit()


@pytest.fixture(scope="module")
def partitioned_url(server_url: str) -> Iterator[str]:
    with fresh_database(server_url, "bp_dist") as url:
        yield url


class Explained:
    """The plans auto_explain sends back, one per statement run on the connections."""

    def __init__(self) -> None:
        self.plans: list[dict[str, Any]] = []

    def __call__(self, diagnostic: Diagnostic) -> None:
        message = diagnostic.message_primary or ""
        if "plan:" in message:
            self.plans.append(json.loads(message.split("plan:", 1)[1]))

    def take(self) -> list[dict[str, Any]]:
        taken, self.plans = self.plans, []
        return taken


@pytest.fixture(scope="module")
async def explained_pool(
    partitioned_url: str,
) -> AsyncIterator[tuple[AsyncConnectionPool[Any], Explained]]:
    await _partition_by_tenant(partitioned_url)
    explained = Explained()

    async def configure(conn: AsyncConnection[Any]) -> None:
        await conn.set_autocommit(True)
        await conn.execute("LOAD 'auto_explain'")
        for name, value in (
            ("auto_explain.log_min_duration", "0"),
            ("auto_explain.log_analyze", "on"),
            ("auto_explain.log_timing", "off"),
            ("auto_explain.log_format", "json"),
            ("auto_explain.log_level", "notice"),
            ("auto_explain.log_nested_statements", "on"),
        ):
            await conn.execute("SELECT set_config(%s, %s, false)", (name, value))
        conn.add_notice_handler(explained)

    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        libpq_url(partitioned_url), min_size=2, max_size=2, open=False, configure=configure
    )
    await pool.open(wait=True)
    try:
        yield pool, explained
    finally:
        await pool.close()


def touched(plan: dict[str, Any]) -> dict[str, set[int]]:
    """The partitions, per table, that a statement's plan really ran a scan of."""
    found: dict[str, set[int]] = {}

    def walk(node: dict[str, Any]) -> None:
        match = PARTITION.match(node.get("Relation Name", ""))
        if match and node.get("Actual Loops", 0) > 0:
            found.setdefault(match.group(1), set()).add(int(match.group(2)))
        for child in node.get("Plans", ()):
            walk(child)

    walk(plan["Plan"])
    return found


def outline(plan: dict[str, Any]) -> str:
    """The statement and its plan's nodes with the loops each ran, for a failure's message."""
    lines = [plan["Query Text"], ""]

    def walk(node: dict[str, Any], depth: int) -> None:
        name = node.get("Relation Name", "")
        cond = node.get("Index Cond") or node.get("Filter") or ""
        loops = node.get("Actual Loops")
        lines.append(f"{'  ' * depth}{node['Node Type']} {name} loops={loops} {cond}")
        for child in node.get("Plans", ()):
            walk(child, depth + 1)

    walk(plan["Plan"], 0)
    return "\n".join(lines)


async def partition_of(pool: AsyncConnectionPool[Any], tenant: str) -> int:
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT tableoid::regclass::text FROM tenants WHERE tenant_id = %s", (tenant,)
        )
        row = await cur.fetchone()
    assert row is not None
    match = PARTITION.match(row[0])
    assert match is not None
    return int(match.group(2))


def assert_single_partition(plans: list[dict[str, Any]], partitions: set[int]) -> set[str]:
    """Every plan ran scans of one partition per table at most, among `partitions`; the
    tables read."""
    assert plans, "auto_explain sent no plan"
    tables: set[str] = set()
    for plan in plans:
        for table, seen in touched(plan).items():
            assert len(seen) == 1 and seen <= partitions, f"{table}: {seen}\n{outline(plan)}"
            tables.add(table)
    return tables


def hot_path(t: str, round_: int) -> list[list[Request]]:
    """Transactions of one tenant: every kind of quota request, alone and batched."""
    tokens = TokenUsage("acme", "dist-model", 600, 400)
    r = f"{round_}-"
    return [
        [ConsumeRequest(t, "messages", 1, f"{r}c")],
        [ConsumeRequest(t, "tokens", 1000, f"{r}w", tokens=tokens)],  # the wallet pays
        [ConsumeRequest(t, "messages", 1, f"{r}d", dry_run=True)],
        [ReserveRequest(t, "messages", 2, f"{r}r1"), ReserveRequest(t, "messages", 2, f"{r}r2")],
        [ConsumeRequest(t, "agents", 1, f"{r}a"), FreeRequest(t, "agents", 1, f"{r}f")],
        [ReportRequest(t, "messages", 1, f"{r}rep", NOW - timedelta(minutes=5))],
        [
            AdmitAllRequest(
                t,
                (
                    ConsumeRequest(t, "messages", 1, f"{r}g:0"),
                    ConsumeRequest(t, "tool_calls", 1, f"{r}g:1"),
                ),
            )
        ],
        [ConsumeRequest(t, "messages", 1, f"{r}c")],  # a replay
    ]


async def test_the_hot_path_touches_one_partition_per_statement(
    explained_pool: tuple[AsyncConnectionPool[Any], Explained],
) -> None:
    pool, explained = explained_pool
    uid = secrets.token_hex(3)
    await f.price(pool, "acme", "dist-model", 2_000_000, 8_000_000, NOW - timedelta(days=1))
    plan = await f.plan(
        pool,
        NOW,
        uid,
        [
            quota("messages", "daily", 1000),
            quota("tool_calls", "daily", 1000),
            quota("tokens", "daily", 0, overage="wallet"),
            quota("agents", "cumulative", 10),
        ],
    )
    tenants = [
        await f.tenant(pool, NOW, f"dist-{uid}-{i}", plan, credits_micros=10**9) for i in range(8)
    ]
    # DB_GENERIC_PLANS=off, as a database partitioned or distributed by tenant runs the
    # sidecar: a generic plan cannot prune by `tenant_id = ANY($1)`
    engine: QuotaEngine = f.engine(pool, FrozenClock(NOW), QuotaRules(), generic_plans=False)
    explained.take()
    tables: set[str] = set()
    for t in tenants[:2]:
        home = {await partition_of(pool, t)}
        for round_ in range(3):
            for batch in hot_path(t, round_):
                answers = await engine.run_batch(batch)
                assert not [a for a in answers if isinstance(a, Exception)], answers
            # Commit and Release of the round's reservations, together
            held = await engine.run_batch(hot_path(t, 100 + round_)[3])
            assert all(isinstance(a, Decision) and a.reservation_id for a in held), held
            first, second = (a.reservation_id for a in held if isinstance(a, Decision))
            await engine.run_batch([CommitRequest(t, first, 1), ReleaseRequest(t, second)])
            await engine.usage(UsageRequest(t))
            tables |= assert_single_partition(explained.take(), home)
    assert {
        "tenants",
        "subscriptions",
        "usage_counters",
        "idempotency_keys",
        "reservations",
        "wallets",
        "wallet_grants",
    } <= tables, tables  # (inserts scan nothing: a row goes to its tenant's partition)
    # a coalesced batch of several tenants touches theirs only
    some = tenants[2:6]
    homes = {await partition_of(pool, t) for t in some}
    await engine.run_batch([ConsumeRequest(t, "messages", 1, f"m-{t}") for t in some])
    for plan_ in explained.take():
        for table, seen in touched(plan_).items():
            assert seen <= homes, (table, seen, homes)


async def test_webhook_processing_touches_one_partition_per_statement(
    explained_pool: tuple[AsyncConnectionPool[Any], Explained], partitioned_url: str
) -> None:
    """A checkout, an upgrade and a cancellation through the control plane and the local
    Stripe; their events, taken from Stripe's event list, are received and applied on the
    explained connections."""
    pool, explained = explained_pool
    uid = secrets.token_hex(3)
    async with billing_stack(partitioned_url) as stack:
        await stack.webhooks(paused=True)  # the events are applied below, not delivered
        adapter = StripeBillingAdapter(stack.settings)
        try:
            async with stack.api() as api:
                plans = await make_plans(api, uid)
                tenant = f"hook-{uid}"
                assert (
                    await api.post("/v1/tenants", json={"tenant_id": tenant, "name": "H"})
                ).status_code == 201
                r = await api.post(
                    f"/v1/tenants/{tenant}/checkout-sessions", json={"plan_id": plans["pro"]}
                )
                assert r.status_code == 201, r.text
                assert (await pay(r.json()["url"])).status_code == 303
                await _apply_events(stack, adapter, pool)
                r = await api.post(
                    f"/v1/tenants/{tenant}/subscription/change", json={"plan_id": plans["team"]}
                )
                assert r.status_code == 200, r.text
                await _apply_events(stack, adapter, pool)
                r = await api.post(
                    f"/v1/tenants/{tenant}/subscription/cancel", json={"cancel_at_period_end": True}
                )
                assert r.status_code == 200, r.text
                await _apply_events(stack, adapter, pool)
                state = (await api.get(f"/v1/tenants/{tenant}/subscription")).json()
                assert state["plan_id"] == plans["team"] and state["cancel_at_period_end"]
        finally:
            await adapter.aclose()
            await stack.webhooks(discard=True)
    home = {await partition_of(pool, tenant)}
    tables = assert_single_partition(explained.take(), home)
    assert {"tenants", "subscriptions", "wallet_grants", "wallets"} <= tables, tables


_applied: set[str] = set()


async def _apply_events(stack: Any, adapter: StripeBillingAdapter, pool: Any) -> None:
    """Every event Stripe made that was not applied yet, oldest first, as a delivery would."""
    async with httpx.AsyncClient(base_url=stack.emulator_url) as http:
        listed = await http.get(
            "/v1/events", params={"limit": 100}, headers={"Authorization": f"Bearer {EMULATOR_KEY}"}
        )
    listed.raise_for_status()
    fresh = [e for e in reversed(listed.json()["data"]) if e["id"] not in _applied]
    assert fresh, "Stripe made no event"
    db = Database(pool)
    for event in fresh:
        _applied.add(event["id"])
        await webhooks.receive(db, adapter, event_from(event), datetime.now(UTC))
