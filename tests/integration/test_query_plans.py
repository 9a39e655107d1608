"""The quota statements reach rows through indexes, never by scanning a big table.

A plan is PostgreSQL's choice, so this is checked where it matters: on a database with
thousands of tenants, keys, counters and records, a run of batches (enough for prepared
statements to switch to generic plans) must not add a single sequential scan of those
tables, nor read idempotency keys through the expiry index (which covers every live key),
nor read more index entries than a few per request (an index scan can read a whole
tenant's keys, or every current subscription, and throw them away in a filter or a hash).
Three times a plan like that cost milliseconds per batch before anyone noticed.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg import AsyncConnection

from billing_core.billing.model import PlanSpec, PriceView, quota
from billing_core.billing.plans import create_plan
from billing_core.billing.prices import set_price
from billing_core.clock import FrozenClock
from billing_core.db.pool import open_pool
from billing_core.db.unit_of_work import Database
from billing_core.quota.answers import CommitResult, Decision
from billing_core.quota.engine import QuotaEngine, QuotaRules
from billing_core.quota.requests import (
    CommitRequest,
    ConsumeRequest,
    FreeRequest,
    ReleaseRequest,
    Request,
    ReserveRequest,
    UsageRequest,
)
from billing_core.rules.pricing import TokenUsage
from tests import factories as f
from tests.conftest import fresh_database

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
TENANTS = 20_000
BIG_TABLES = (
    "tenants",
    "subscriptions",
    "idempotency_keys",
    "usage_counters",
    "usage_records",
    "wallets",
    "wallet_grants",
    "reservations",
)


async def _populate(url: str, tenants: int = TENANTS, *, analyze: bool = True) -> str:
    db = await Database.open(url, 1)
    try:
        async with db.transaction() as uow:
            await set_price(
                uow, "tests", PriceView("p", "m", NOW - timedelta(days=1), 10**6, 0), NOW
            )
            created = await create_plan(
                uow,
                "tests",
                PlanSpec(
                    name="plans-guard",
                    price_cents=100,
                    quotas=(
                        quota("messages", "daily", 10**9),
                        quota("messages", "monthly", 10**12),
                        quota("tokens", "daily", 50, overage="wallet"),
                        quota("agents", "cumulative", 10**9),
                    ),
                ),
                NOW - timedelta(days=40),
            )
    finally:
        await db.close()
    plan = created.plan_id
    async with await AsyncConnection.connect(url, autocommit=True) as conn:
        await _grow(conn, plan, 0, tenants)
        if analyze:
            await conn.execute("ANALYZE")
        return plan


async def _grow(conn: AsyncConnection[Any], plan: str, first: int, n: int) -> None:
    """Tenants g-{first+1}..g-{first+n}, each with a subscription, a wallet and a grant, two
    idempotency keys, two counters, two usage records and two committed reservations."""
    then = NOW - timedelta(days=40)
    args = {"then": then, "now": NOW, "first": first, "n": n, "plan": plan}
    for sql in (
        "INSERT INTO tenants (tenant_id, name, timezone, created_at)"
        " SELECT 'g-' || i, 'g', 'UTC', %(then)s"
        " FROM generate_series(%(first)s + 1, %(first)s + %(n)s) i",
        "INSERT INTO subscriptions (tenant_id, subscription_id, plan_id, status, is_current,"
        " billing_cycle_anchor, created_at, updated_at)"
        " SELECT 'g-' || i, 'sub-g-' || i, %(plan)s, 'active', true, %(then)s, %(then)s,"
        " %(then)s FROM generate_series(%(first)s + 1, %(first)s + %(n)s) i",
        "INSERT INTO wallets (tenant_id, balance_micros, held_micros, updated_at)"
        " SELECT 'g-' || i, 10000000, 0, %(then)s"
        " FROM generate_series(%(first)s + 1, %(first)s + %(n)s) i",
        "INSERT INTO wallet_grants (tenant_id, grant_id, grant_key, source, amount_micros,"
        " remaining_micros, created_at)"
        " SELECT 'g-' || i, 'gr-' || i, 'k-' || i, 'manual', 10000000, 10000000, %(then)s"
        " FROM generate_series(%(first)s + 1, %(first)s + %(n)s) i",
        "INSERT INTO idempotency_keys (tenant_id, request_id, operation, request_hash,"
        " response, created_at, expires_at)"
        " SELECT 'g-' || (%(first)s + i %% %(n)s + 1), 'old-' || i, 'consume', 'h', '{}',"
        " %(then)s, %(now)s + interval '1 hour' FROM generate_series(1, 2 * %(n)s) i",
        "INSERT INTO usage_counters (tenant_id, resource, period, window_start, used)"
        " SELECT 'g-' || (%(first)s + i %% %(n)s + 1), 'messages', 'daily',"
        " %(then)s + (i / %(n)s) * interval '1 day', 1"
        " FROM generate_series(0, 2 * %(n)s - 1) i",
        "INSERT INTO usage_records (tenant_id, usage_record_id, resource, amount, kind,"
        " request_id, cost_micros, occurred_at)"
        " SELECT 'g-' || (%(first)s + i %% %(n)s + 1), 'ur-old-' || %(first)s || '-' || i,"
        " 'messages', 1, 'consume', 'old-' || i, 0, %(then)s"
        " FROM generate_series(1, 2 * %(n)s) i",
        "INSERT INTO reservations (tenant_id, reservation_id, request_id, resource, amount,"
        " windows, status, expires_at, created_at)"
        " SELECT 'g-' || (%(first)s + i %% %(n)s + 1), 'rsv-old-' || %(first)s || '-' || i,"
        " 'old-' || i, 'messages', 1, '[]', 'committed', %(then)s, %(then)s"
        " FROM generate_series(1, 2 * %(n)s) i",
    ):
        await conn.execute(sql, args)


async def _scans(url: str) -> dict[str, int]:
    async with await AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT relname, seq_scan FROM pg_stat_user_tables WHERE relname = ANY(%s)",
            (list(BIG_TABLES),),
        )
        found = {name: int(n) for name, n in await cur.fetchall()}
        cur = await conn.execute(
            "SELECT coalesce(sum(idx_scan), 0) FROM pg_stat_user_indexes"
            " WHERE indexrelname = 'ix_idempotency_keys_expires_at'"
        )
        row = await cur.fetchone()
        found["by expiry: idempotency_keys"] = int(row[0]) if row else 0
        return found


async def _index_reads(url: str) -> dict[str, int]:
    """Index entries read so far, per big table (every index of the table)."""
    async with await AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT relname, coalesce(sum(idx_tup_read), 0) FROM pg_stat_user_indexes"
            " WHERE relname = ANY(%s) GROUP BY relname",
            (list(BIG_TABLES),),
        )
        return {name: int(n) for name, n in await cur.fetchall()}


async def _settled(
    url: str, read: Callable[[str], Awaitable[dict[str, int]]] = _scans
) -> dict[str, int]:
    """Counters once every backend that worked on the database has reported (backends
    report when they exit, and closed connections exit shortly after)."""
    last = await read(url)
    for _ in range(20):
        await asyncio.sleep(0.25)
        now = await read(url)
        if now == last:
            return now
        last = now
    return last


async def _batches(engine: QuotaEngine, rng: random.Random, count: int, tenants: int) -> None:
    """Batches of CheckAndConsume and Reserve, and Commits and Releases of the last batch's
    reservations."""
    answers: list[Any] = []
    held: list[tuple[str, str]] = []
    for batch in range(count):
        reqs: list[Request] = [
            CommitRequest(t, r, 1) if k % 2 else ReleaseRequest(t, r)
            for k, (t, r) in enumerate(held)
        ]
        for i in range(rng.randint(1, 24)):
            tenant = f"g-{rng.randint(1, tenants)}"
            request_id = f"b{batch}-{rng.random()}-{i}"
            draw = rng.random()
            if draw < 0.4:
                reqs.append(ConsumeRequest(tenant, "messages", 1, request_id))
            elif draw < 0.6:
                reqs.append(ReserveRequest(tenant, "messages", 2, request_id))
            else:
                tokens = TokenUsage("p", "m", 30, 0)
                reqs.append(ConsumeRequest(tenant, "tokens", 30, request_id, False, tokens))
        done = await engine.run_batch(reqs)
        answers += done
        held = [
            (r.tenant_id, a.reservation_id)
            for r, a in zip(reqs, done, strict=True)
            if isinstance(a, Decision) and a.reservation_id
        ]
    assert answers and all(
        a is True or isinstance(a, CommitResult) or (isinstance(a, Decision) and a.allowed)
        for a in answers
    ), answers


def _added(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {name: after[name] - before.get(name, 0) for name in after}


async def test_batches_never_scan_a_big_table(server_url: str) -> None:
    with fresh_database(server_url, "bp_plans") as url:
        await _populate(url)
        before = await _settled(url)
        pool = await open_pool(url, 2)
        try:
            engine = f.engine(pool, FrozenClock(NOW), QuotaRules())
            # > 5 runs of each statement: generic plans may be chosen
            await _batches(engine, random.Random(7), 40, TENANTS)
        finally:
            await pool.close()
        after = await _settled(url)
    added = _added(before, after)
    assert added == {name: 0 for name in after}, f"scans added by the batches: {added}"


async def test_a_busy_tenant_costs_a_batch_no_more_index_reads_than_a_quiet_one(
    server_url: str,
) -> None:
    """One tenant with 20,000 live idempotency keys among 20,000 tenants, statistics fresh:
    every batch (half of its requests the busy tenant's) reads a few index entries per
    request from each table, not the busy tenant's keys nor every current subscription."""
    with fresh_database(server_url, "bp_busy") as url:
        async with await AsyncConnection.connect(url, autocommit=True) as conn:
            await conn.execute(
                "INSERT INTO idempotency_keys (tenant_id, request_id, operation,"
                " request_hash, response, created_at, expires_at)"
                " SELECT 'g-1', 'busy-' || i, 'consume', 'h', '{}', %s, %s"
                " FROM generate_series(1, 20000) i",
                (NOW - timedelta(minutes=5), NOW + timedelta(hours=1)),
            )
        await _populate(url)  # analyzes, the busy tenant's keys included
        before = await _settled(url, _index_reads)
        pool = await open_pool(url, 2)
        rng = random.Random(17)
        requests = 0
        try:
            engine = f.engine(pool, FrozenClock(NOW), QuotaRules())
            for batch in range(30):  # > 5 runs of each statement: generic plans may be chosen
                reqs = []
                for i in range(rng.randint(1, 8)):
                    tenant = "g-1" if i % 2 == 0 else f"g-{rng.randint(2, TENANTS)}"
                    reqs.append(ConsumeRequest(tenant, "messages", 1, f"q{batch}-{i}"))
                requests += len(reqs)
                answers = await engine.run_batch(reqs)
                assert all(isinstance(a, Decision) and a.allowed for a in answers), answers
        finally:
            await pool.close()
        after = await _settled(url, _index_reads)
    added = _added(before, after)
    heavy = {name: n for name, n in added.items() if n > 10 * requests}
    assert not heavy, f"index entries read for {requests} requests: {added}"


Workload = Callable[[QuotaEngine, random.Random, int, int], Awaitable[None]]


async def _scans_after_growth(
    server_url: str, name: str, work: Workload, seed: int, rounds: int
) -> None:
    """A sidecar starts on a young database, its statements' plans are cached, then the
    tables grow by thousands of rows before anything analyzes them again (as in `make
    bench`, and in any fresh deployment): the cached plans must still use the indexes."""
    with fresh_database(server_url, name) as url:
        plan = await _populate(url, 40)
        async with await AsyncConnection.connect(url, autocommit=True) as conn:
            for table in BIG_TABLES:  # nothing may analyze them behind the test's back
                await conn.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = off)")
        pool = await open_pool(url, 1)
        rng = random.Random(seed)
        try:
            engine = f.engine(pool, FrozenClock(NOW), QuotaRules())
            await work(engine, rng, 12, 40)  # plans made, on tables of a few pages
            async with await AsyncConnection.connect(url, autocommit=True) as conn:
                await _grow(conn, plan, 40, TENANTS)
            before = await _settled(url)
            reads_before = await _settled(url, _index_reads)
            await work(engine, rng, rounds, 40 + TENANTS)
        finally:
            await pool.close()
        after = await _settled(url)
        reads = _added(reads_before, await _settled(url, _index_reads))
    added = _added(before, after)
    assert added == {name: 0 for name in after}, f"scans added after the growth: {added}"
    # a few entries per call and table: not a table's worth
    heavy = {name: n for name, n in reads.items() if n > TENANTS // 2}
    assert not heavy, f"index entries read after the growth: {reads}"


async def _lone_calls(engine: QuotaEngine, rng: random.Random, count: int, tenants: int) -> None:
    """CheckAndConsume, Reserve then Commit, Free and GetUsage, one call at a time."""
    for n in range(count):
        tenant = f"g-{rng.randint(1, tenants)}"
        tag = f"{n}-{rng.random()}"
        assert (await engine.consume(ConsumeRequest(tenant, "messages", 1, f"c{tag}"))).allowed
        held = await engine.reserve(ReserveRequest(tenant, "messages", 2, f"r{tag}"))
        assert held.allowed
        await engine.commit(CommitRequest(tenant, held.reservation_id, 1))
        assert (await engine.consume(ConsumeRequest(tenant, "agents", 1, f"a{tag}"))).allowed
        await engine.free(FreeRequest(tenant, "agents", 1, f"f{tag}"))
        await engine.usage(UsageRequest(tenant))


async def test_plans_made_while_the_tables_were_small_survive_their_growth(
    server_url: str,
) -> None:
    await _scans_after_growth(server_url, "bp_growth", _batches, 11, rounds=20)


async def test_lone_calls_survive_the_growth_too(server_url: str) -> None:
    """Calls each in a transaction of its own: CheckAndConsume, Reserve, Commit, Free,
    GetUsage."""
    await _scans_after_growth(server_url, "bp_growth_single", _lone_calls, 13, rounds=15)
