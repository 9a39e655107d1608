"""Batches that fail as a whole (a request_id taken meanwhile, a lock held elsewhere, a bug,
statements the connection forgot, a dead connection) still answer every request once."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from psycopg.types.json import Jsonb

from billing_core.billing.model import quota
from billing_core.clock import FrozenClock
from billing_core.db.pool import open_pool
from billing_core.errors import QuotaError
from billing_core.quota.answers import Decision, Result
from billing_core.quota.engine import QuotaRules
from billing_core.quota.requests import (
    ConsumeRequest,
    Request,
)
from billing_core.rules.pricing import TokenUsage
from tests import factories as f
from tests.integration.batching import Pool, break_batches, outcome, without_fallback
from tests.integration.test_properties import START

MODEL = "coalesce-model"


async def test_a_twin_committed_meanwhile_is_replayed_not_counted_twice(
    pool: Pool, uid: str
) -> None:
    """Another transaction (another sidecar) takes a request_id while the batch decides:
    the batch notices at its claim, rolls back and decides one request per transaction,
    replaying the twin."""
    clock = FrozenClock(START)
    # no lock timeout: the batch waits for the twin however slow the machine (the race is
    # under test here; past a lock timeout the requests would go one by one all the same)
    engine = f.engine(pool, clock, QuotaRules(batch_lock_timeout_s=0))
    plan = await f.plan(pool, START, uid, [quota("tool_calls", "daily", 10)])
    t = await f.tenant(pool, START, f"twin-{uid}", plan)
    twin = ConsumeRequest(t, "tool_calls", 3, "twin")
    other = ConsumeRequest(t, "tool_calls", 1, "other")
    answer = await engine.consume(ConsumeRequest(t, "tool_calls", 3, "seed"))
    async with pool.connection() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO idempotency_keys (tenant_id, request_id, operation, request_hash,"
            " response, created_at, expires_at) VALUES (%s, 'twin', 'consume', %s, %s, %s, %s)",
            (t, twin.fingerprint("consume"), Jsonb(answer.to_json()), START,
             START + timedelta(hours=1)),
        )  # fmt: skip
        batch = asyncio.create_task(engine.run_batch([other, twin]))
        await asyncio.sleep(0.3)
        assert not batch.done()  # waiting on the uncommitted twin's key
    first, second = await batch
    assert isinstance(first, Decision) and first.allowed and not first.replayed
    assert isinstance(second, Decision) and second.replayed
    assert second.usage_record_id == answer.usage_record_id
    assert engine.stats.fallbacks == {"race": 1, "locked": 0, "refused": 0, "failed": 0}
    [(used, records)] = await f.fetch(
        pool,
        "SELECT (SELECT sum(used) FROM usage_counters WHERE tenant_id = %s),"
        " (SELECT count(*) FROM usage_records WHERE tenant_id = %s)",
        t,
        t,
    )
    # the seed and `other`: the twin's owner (here the seed stands in for it) counted it once
    assert (used, records) == (3 + 1, 2)


async def test_a_failing_batch_is_decided_one_by_one(
    pool: Pool, uid: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever fails a batch as a whole, every caller still gets its own answer."""

    break_batches(monkeypatch)
    engine = f.engine(pool, FrozenClock(START), QuotaRules())
    plan = await f.plan(pool, START, uid, [quota("tool_calls", "daily", 2)])
    t = await f.tenant(pool, START, f"broken-{uid}", plan)
    results = await engine.run_batch(
        [ConsumeRequest(t, "tool_calls", 1, f"b{i}") for i in range(3)]
        + [ConsumeRequest(f"ghost-{uid}", "tool_calls", 1, "g")]
    )
    assert [r.allowed if isinstance(r, Decision) else type(r).__name__ for r in results] == [
        True,
        True,
        False,
        "NotFound",
    ]
    assert engine.stats.fallbacks == {"race": 0, "locked": 0, "refused": 0, "failed": 1}


async def test_a_bug_that_fails_one_request_alone_fails_only_that_request(
    pool: Pool, uid: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch fails as a whole, and so does one request's own transaction with an
    unexpected error: that request gets an internal error, its neighbours their answers."""

    break_batches(
        monkeypatch, failing=lambda r: isinstance(r, ConsumeRequest) and r.request_id == "b1"
    )
    engine = f.engine(pool, FrozenClock(START), QuotaRules())
    plan = await f.plan(pool, START, uid, [quota("tool_calls", "daily", 5)])
    t = await f.tenant(pool, START, f"bug-{uid}", plan)
    results = await engine.run_batch(
        [ConsumeRequest(t, "tool_calls", 1, f"b{i}") for i in range(3)]
    )
    assert [r.allowed if isinstance(r, Decision) else outcome(r) for r in results] == [
        True,
        ("QuotaError", "internal error (ValueError), logged"),
        True,
    ]


async def test_a_changed_plan_is_enforced_by_the_very_next_batch(pool: Pool, uid: str) -> None:
    """A batch locks with its reads the rows the tenant's last shape predicts; after a plan
    change the prediction is wrong, and the batch still decides by the new plan (locking
    the new window and the wallet the old plan never needed) and leaves no row behind for
    the old window."""
    engine = f.engine(pool, FrozenClock(START), QuotaRules())
    await f.price(pool, "p", MODEL, 1_000_000, 0, START)  # 1 micro per token
    daily = await f.plan(pool, START, f"{uid}-d", [quota("tokens", "daily", 100)])
    weekly = await f.plan(pool, START, f"{uid}-w", [quota("tokens", "weekly", 4, overage="wallet")])
    t = await f.tenant(pool, START, f"shape-{uid}", daily, credits_micros=1000)

    def ask(amount: int, request_id: str, dry_run: bool = False) -> ConsumeRequest:
        return ConsumeRequest(
            t, "tokens", amount, request_id, dry_run, TokenUsage("p", MODEL, amount, 0)
        )

    without_fallback(engine)
    [probe] = await engine.run_batch([ask(3, "probe", dry_run=True)])
    assert isinstance(probe, Decision) and probe.allowed  # the engine now knows: daily
    await f.subscribe(pool, t, weekly, START)
    first, second = await engine.run_batch([ask(3, "a"), ask(2, "b")])
    assert isinstance(first, Decision) and first.allowed
    assert [w.period.value for w in first.windows] == ["weekly"]
    # 5 > 4 a week: the wallet pays for the one token over (the daily plan had no wallet)
    assert isinstance(second, Decision) and second.allowed
    assert second.wallet_balance_micros == 1000 - 1
    counters = await f.fetch(
        pool, "SELECT period, used FROM usage_counters WHERE tenant_id = %s ORDER BY 1", t
    )
    assert counters == [("weekly", 5)]


async def test_a_batch_after_psycopg_deallocated_its_statements_is_retried(
    database_url: str, pool: Pool, uid: str
) -> None:
    """psycopg runs DEALLOCATE ALL on a connection after a ROLLBACK there, which forgets the
    batch statements too: the batch is retried, prepared again — not decided one by one."""
    lane = await open_pool(database_url, 1)
    try:
        engine = f.engine(pool, FrozenClock(START), QuotaRules(), batch_pool=lane)

        without_fallback(engine)
        plan = await f.plan(pool, START, uid, [quota("tool_calls", "daily", 10)])
        t = await f.tenant(pool, START, f"dealloc-{uid}", plan)
        for i in range(3):
            [result] = await engine.run_batch([ConsumeRequest(t, "tool_calls", 1, f"d{i}")])
            assert isinstance(result, Decision) and result.allowed
            async with lane.connection() as conn:
                await conn.execute("DEALLOCATE ALL")
        used = await f.fetch(pool, "SELECT used FROM usage_counters WHERE tenant_id = %s", t)
        assert used == [(3,)]
    finally:
        await lane.close()


async def test_a_batch_past_its_lock_timeout_answers_each_tenant_as_it_is_decided(
    database_url: str, pool: Pool, uid: str
) -> None:
    """run_batch itself: one tenant's counter row is locked elsewhere past the batch's
    lock timeout; the batch's transaction gives up, its requests are decided one by one,
    each tenant on its own, and `answer` hears of the others' while the lock is still held;
    the locked tenant's two requests are answered once it is free, in their order; every
    request counts once."""
    lane = await open_pool(database_url, 1)
    rules = QuotaRules(batch_lock_timeout_s=0.05)
    engine = f.engine(pool, FrozenClock(START), rules, batch_pool=lane)
    try:
        plan = await f.plan(pool, START, uid, [quota("messages", "daily", 100)])
        stuck = await f.tenant(pool, START, f"stuck-{uid}", plan)
        others = [await f.tenant(pool, START, f"free{i}-{uid}", plan) for i in range(3)]
        [first] = await engine.run_batch([ConsumeRequest(stuck, "messages", 1, "s0")])
        assert isinstance(first, Decision) and first.allowed  # its counter row exists now
        reqs: list[Request] = [
            ConsumeRequest(stuck, "messages", 1, "s1"),
            *(ConsumeRequest(t, "messages", 1, "o") for t in others),
            ConsumeRequest(stuck, "messages", 0, "bad"),  # invalid: answered at once
            ConsumeRequest(stuck, "messages", 1, "s2"),
        ]
        answered: dict[int, Result] = {}
        free = asyncio.Event()

        def answer(i: int, result: Result) -> None:
            answered[i] = result
            if {1, 2, 3, 4} <= answered.keys():
                free.set()

        async with pool.connection() as blocker, blocker.transaction():
            await blocker.execute(
                "SELECT 1 FROM usage_counters WHERE tenant_id = %s FOR UPDATE", (stuck,)
            )
            batch = asyncio.ensure_future(engine.run_batch(reqs, answer=answer))
            await asyncio.wait_for(free.wait(), 10)
            assert answered.keys() == {1, 2, 3, 4} and not batch.done()
            assert isinstance(answered[4], QuotaError)
            assert engine.stats.fallbacks == {"race": 0, "locked": 1, "refused": 0, "failed": 0}
        results = await asyncio.wait_for(batch, 10)
    finally:
        await lane.close()
    assert answered == dict(enumerate(results))
    used = [r.windows[0].used if isinstance(r, Decision) else None for r in results]
    assert used == [2, 1, 1, 1, None, 3]
    books = await f.fetch(
        pool,
        "SELECT c.tenant_id, c.used, (SELECT sum(amount) FROM usage_records r"
        " WHERE r.tenant_id = c.tenant_id) FROM usage_counters c"
        " WHERE c.tenant_id = ANY(%s) ORDER BY c.tenant_id",
        [stuck, *others],
    )
    assert sorted(b[1:] for b in books) == [(1, 1)] * 3 + [(3, 3)]


async def test_a_connection_that_died_between_calls_is_replaced_unnoticed(
    database_url: str, pool: Pool, uid: str
) -> None:
    """The backends behind the engine's connections are terminated between calls (an idle
    timeout, a proxy, an operator): the next batch and the next one-by-one call each find
    their connection dead, take another and answer — nobody sees UNAVAILABLE — and count
    once."""
    lane, shared = await open_pool(database_url, 1), await open_pool(database_url, 1)
    try:
        engine = f.engine(shared, FrozenClock(START), QuotaRules(), batch_pool=lane)
        plan = await f.plan(pool, START, uid, [quota("messages", "daily", 100)])
        t = await f.tenant(pool, START, f"dead-{uid}", plan)
        for round_ in range(2):
            [batched] = await engine.run_batch([ConsumeRequest(t, "messages", 1, f"b{round_}")])
            alone = await engine.consume(ConsumeRequest(t, "messages", 1, f"a{round_}"))
            assert isinstance(batched, Decision) and batched.allowed and alone.allowed
            pids = []
            for p in (lane, shared):
                async with p.connection() as conn:
                    pids.append(conn.info.backend_pid)
            async with pool.connection() as admin:
                await admin.execute("SELECT pg_terminate_backend(p) FROM unnest(%s) p", (pids,))
        [(used, records)] = await f.fetch(
            pool,
            "SELECT (SELECT sum(used) FROM usage_counters WHERE tenant_id = %s),"
            " (SELECT count(*) FROM usage_records WHERE tenant_id = %s)",
            t,
            t,
        )
        assert (used, records) == (4, 4)
        assert engine.connections_lost == 2  # round 1's batch and call, once each
    finally:
        await lane.close()
        await shared.close()
