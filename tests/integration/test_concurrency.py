"""Many callers on many connections at once: zero overshoot, zero lost, zero double-counted."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool

from billing_core.billing.model import quota
from billing_core.clock import FrozenClock
from billing_core.db.pool import open_pool
from billing_core.quota.answers import Decision
from billing_core.quota.engine import QuotaEngine, QuotaRules
from billing_core.quota.requests import ConsumeRequest
from billing_core.rules.limits import Reason
from billing_core.rules.pricing import TokenUsage
from tests import factories as f

Pool = AsyncConnectionPool[Any]
CALLERS = 64


@pytest.fixture(scope="module")
async def wide_pool(database_url: str) -> AsyncIterator[Pool]:
    """32 connections: enough that callers really contend on the same rows."""
    pool = await open_pool(database_url, 32)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
def wide_engine(wide_pool: Pool, clock: FrozenClock) -> QuotaEngine:
    return f.engine(wide_pool, clock, QuotaRules(), acquire_timeout_s=30)


async def run_callers(
    n: int, attempts: int, call: Callable[[int, int], Awaitable[Decision]]
) -> list[Decision]:
    """`n` callers, each making `attempts` calls one after another, all callers at once."""
    start = asyncio.Event()

    async def caller(c: int) -> list[Decision]:
        await start.wait()
        return [await call(c, i) for i in range(attempts)]

    tasks = [asyncio.create_task(caller(c)) for c in range(n)]
    start.set()
    return [d for batch in await asyncio.gather(*tasks) for d in batch]


async def totals(pool: Pool, tenant: str) -> tuple[int, int, int]:
    """(sum of usage records, counter total over the tenant's windows, records count)."""
    [(records_sum, records_n)] = await f.fetch(
        pool,
        "SELECT coalesce(sum(amount), 0), count(*) FROM usage_records WHERE tenant_id = %s",
        tenant,
    )
    rows = await f.fetch(
        pool, "SELECT period, used, reserved FROM usage_counters WHERE tenant_id = %s", tenant
    )
    assert all(reserved == 0 for _, _, reserved in rows)
    daily = sum(used for period, used, _ in rows if period == "daily")
    return int(records_sum), daily, int(records_n)


async def test_64_callers_against_a_limit_of_1000_get_exactly_1000(
    wide_pool: Pool, wide_engine: QuotaEngine, clock: FrozenClock, uid: str
) -> None:
    plan = await f.plan(wide_pool, clock.now(), uid, [quota("messages", "daily", 1000)])
    t = await f.tenant(wide_pool, clock.now(), f"t-{uid}", plan)

    async def call(c: int, i: int) -> Decision:
        return await wide_engine.consume(ConsumeRequest(t, "messages", 1, f"c{c}-{i}"))

    decisions = await run_callers(CALLERS, 20, call)  # 1,280 requests
    allowed = [d for d in decisions if d.allowed]
    denied = [d for d in decisions if not d.allowed]
    assert len(allowed) == 1000
    assert {d.reason for d in denied} == {Reason.QUOTA_EXCEEDED}
    assert len({d.usage_record_id for d in allowed}) == 1000
    assert await totals(wide_pool, t) == (1000, 1000, 1000)


async def test_mixed_amounts_never_overshoot_and_every_allowed_unit_is_recorded(
    wide_pool: Pool, wide_engine: QuotaEngine, clock: FrozenClock, uid: str
) -> None:
    plan = await f.plan(wide_pool, clock.now(), uid, [quota("tool_calls", "daily", 1000)])
    t = await f.tenant(wide_pool, clock.now(), f"t-{uid}", plan)
    amounts = random.Random(7)

    async def call(c: int, i: int) -> Decision:
        amount = amounts.randint(1, 9)
        return await wide_engine.consume(ConsumeRequest(t, "tool_calls", amount, f"c{c}-{i}"))

    decisions = await run_callers(CALLERS, 6, call)
    records_sum, counter, records_n = await totals(wide_pool, t)
    allowed = [d for d in decisions if d.allowed]
    assert records_n == len(allowed)
    assert records_sum == counter <= 1000
    # every denial saw a window that could not take its amount, so the limit was really near
    assert all(d.windows[0].remaining < 9 for d in decisions if not d.allowed)


@pytest.mark.parametrize(
    ("wallet_micros", "expected_allowed", "expected_balance", "last_reason"),
    [
        # daily 1,000 free, then 10 micros per unit from the wallet: 2,000 pays 200 more
        (2_000, 1_200, 0, Reason.INSUFFICIENT_CREDITS),
        # the monthly 1,300 (block) stops it first; 3,000 micros are spent, 2,000 remain
        (5_000, 1_300, 2_000, Reason.QUOTA_EXCEEDED),
    ],
    ids=["wallet-runs-out", "monthly-limit-binds"],
)
async def test_two_windows_plus_wallet_are_exact_under_contention(
    wide_pool: Pool,
    wide_engine: QuotaEngine,
    clock: FrozenClock,
    uid: str,
    wallet_micros: int,
    expected_allowed: int,
    expected_balance: int,
    last_reason: Reason,
) -> None:
    now = clock.now()
    model = f"m-{uid}"
    await f.price(wide_pool, "acme-ai", model, 1_000_000, 0, now)  # 1 micro per input token
    plan = await f.plan(
        wide_pool,
        now,
        uid,
        [
            quota("tokens", "daily", 1000, overage="wallet"),
            quota("tokens", "monthly", 1300),
        ],
    )
    t = await f.tenant(wide_pool, now, f"t-{uid}", plan, credits_micros=wallet_micros)
    tokens = TokenUsage("acme-ai", model, 10, 0)

    async def call(c: int, i: int) -> Decision:
        return await wide_engine.consume(ConsumeRequest(t, "tokens", 1, f"c{c}-{i}", tokens=tokens))

    decisions = await run_callers(CALLERS, 24, call)  # 1,536 requests
    allowed = [d for d in decisions if d.allowed]
    assert len(allowed) == expected_allowed
    assert {d.reason for d in decisions if not d.allowed} == {last_reason}
    [(balance, ledger_sum)] = await f.fetch(
        wide_pool,
        "SELECT w.balance_micros, (SELECT sum(delta_micros) FROM wallet_ledger l"
        " WHERE l.tenant_id = w.tenant_id) FROM wallets w WHERE w.tenant_id = %s",
        t,
    )
    assert balance == ledger_sum == expected_balance
    [(charged,)] = await f.fetch(
        wide_pool,
        "SELECT sum(wallet_charged_micros) FROM usage_records WHERE tenant_id = %s",
        t,
    )
    assert charged == wallet_micros - expected_balance
    counters = dict(
        await f.fetch(wide_pool, "SELECT period, used FROM usage_counters WHERE tenant_id = %s", t)
    )
    assert counters == {"daily": expected_allowed, "monthly": expected_allowed}


async def test_each_request_sent_three_times_at_once_is_counted_once(
    wide_pool: Pool, wide_engine: QuotaEngine, clock: FrozenClock, uid: str
) -> None:
    plan = await f.plan(wide_pool, clock.now(), uid, [quota("research_runs", "monthly", 1000)])
    t = await f.tenant(wide_pool, clock.now(), f"t-{uid}", plan)

    async def call(c: int, i: int) -> list[Decision]:
        req = ConsumeRequest(t, "research_runs", 2, f"c{c}-{i}")
        return list(await asyncio.gather(*(wide_engine.consume(req) for _ in range(3))))

    start = asyncio.Event()

    async def caller(c: int) -> list[list[Decision]]:
        await start.wait()
        return [await call(c, i) for i in range(10)]  # 640 distinct requests of 2

    tasks = [asyncio.create_task(caller(c)) for c in range(CALLERS)]
    start.set()
    triples = [triple for batch in await asyncio.gather(*tasks) for triple in batch]

    allowed_triples = 0
    for triple in triples:
        outcomes = {d.allowed for d in triple}
        assert len(outcomes) == 1, "copies of one request must get one answer"
        if triple[0].allowed:
            allowed_triples += 1
            assert sorted(d.replayed for d in triple) == [False, True, True]
            assert len({d.usage_record_id for d in triple}) == 1
    assert allowed_triples == 500
    records_sum, _, records_n = await totals(wide_pool, t)
    assert (records_sum, records_n) == (1000, 500)
    [(keys,)] = await f.fetch(
        wide_pool, "SELECT count(*) FROM idempotency_keys WHERE tenant_id = %s", t
    )
    assert keys == 500
