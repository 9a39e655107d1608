"""CheckAndConsume, Reserve/Commit/Release, Free and GetUsage against real PostgreSQL."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from billing_core.billing.model import quota
from billing_core.clock import FrozenClock
from billing_core.db.pool import open_pool
from billing_core.errors import Conflict, InvalidRequest, NotFound
from billing_core.quota.engine import QuotaEngine, QuotaRules
from billing_core.quota.requests import (
    CommitRequest,
    ConsumeRequest,
    FreeRequest,
    ReleaseRequest,
    ReserveRequest,
    UsageRequest,
)
from billing_core.quota.sweeps import Sweeper
from billing_core.rules.limits import Reason, SubscriptionStatus, WindowState
from billing_core.rules.pricing import TokenUsage
from tests import factories as f

Pool = AsyncConnectionPool[Any]


async def test_consume_counts_until_the_limit_then_denies_with_a_message(
    pool: Pool, engine: QuotaEngine, clock: FrozenClock, uid: str
) -> None:
    plan = await f.plan(pool, clock.now(), uid, [quota("messages", "daily", 10)])
    t = await f.tenant(pool, clock.now(), f"t-{uid}", plan, timezone="Europe/Berlin")
    first = await engine.consume(ConsumeRequest(t, "messages", 7, "r1"))
    assert first.allowed and first.reason is Reason.ALLOWED and first.usage_record_id
    assert [(w.used, w.remaining, w.state) for w in first.windows] == [(7, 3, WindowState.OK)]
    second = await engine.consume(ConsumeRequest(t, "messages", 4, "r2"))
    assert not second.allowed and second.reason is Reason.QUOTA_EXCEEDED
    assert second.message == "Daily messages limit of 10 reached; resets at 00:00 Europe/Berlin."
    assert second.windows[0].used == 7
    third = await engine.consume(ConsumeRequest(t, "messages", 3, "r2"))
    assert third.allowed and third.windows[0].state is WindowState.EXHAUSTED
    rows = await f.fetch(pool, "SELECT sum(amount) FROM usage_records WHERE tenant_id = %s", t)
    assert rows == [(10,)]


async def test_same_request_id_replays_and_a_different_request_is_rejected(
    pool: Pool, engine: QuotaEngine, clock: FrozenClock, uid: str
) -> None:
    plan = await f.plan(pool, clock.now(), uid, [quota("tool_calls", "monthly", 100)])
    t = await f.tenant(pool, clock.now(), f"t-{uid}", plan)
    first = await engine.consume(ConsumeRequest(t, "tool_calls", 5, "same"))
    again = await engine.consume(ConsumeRequest(t, "tool_calls", 5, "same"))
    assert again.replayed and not first.replayed
    assert again.usage_record_id == first.usage_record_id
    assert again.windows == first.windows
    with pytest.raises(InvalidRequest, match="already used for a different request"):
        await engine.consume(ConsumeRequest(t, "tool_calls", 6, "same"))
    usage = await engine.usage(UsageRequest(t))
    assert usage.resources[0].windows[0].used == 5


async def test_dry_run_decides_and_writes_nothing(
    pool: Pool, engine: QuotaEngine, clock: FrozenClock, uid: str
) -> None:
    plan = await f.plan(pool, clock.now(), uid, [quota("tokens", "daily", 100)])
    t = await f.tenant(pool, clock.now(), f"t-{uid}", plan)
    dry = await engine.consume(ConsumeRequest(t, "tokens", 60, "d1", dry_run=True))
    assert dry.allowed and dry.windows[0].used == 60 and not dry.usage_record_id
    for table in ("usage_records", "usage_counters", "idempotency_keys"):
        assert await f.fetch(pool, f"SELECT 1 FROM {table} WHERE tenant_id = %s", t) == []


async def test_denials_for_subscription_states_and_missing_resource(
    pool: Pool, engine: QuotaEngine, clock: FrozenClock, uid: str
) -> None:
    now = clock.now()
    # a resource only `bigger` offers: other tests' plans in the shared database never compete
    probe = f"custom:probe-{uid}"
    plan = await f.plan(pool, now, uid, [quota("messages", "daily", 10)])
    bigger = await f.plan(
        pool,
        now,
        uid,
        [quota("messages", "daily", 10), quota(probe, "cumulative", 5)],
        name="bigger",
        price_cents=5000,
    )
    cases = {
        "none": (None, SubscriptionStatus.ACTIVE, None, None, Reason.NO_ACTIVE_SUBSCRIPTION),
        "trial": (
            plan,
            SubscriptionStatus.TRIALING,
            now - timedelta(seconds=1),
            None,
            Reason.TRIAL_EXPIRED,
        ),
        "pastdue": (
            plan,
            SubscriptionStatus.PAST_DUE,
            None,
            now - timedelta(days=4),
            Reason.PAYMENT_PAST_DUE,
        ),
        "grace": (plan, SubscriptionStatus.PAST_DUE, None, now - timedelta(days=1), Reason.ALLOWED),
        "canceled": (plan, SubscriptionStatus.CANCELED, None, None, Reason.NO_ACTIVE_SUBSCRIPTION),
    }
    for name, (plan_id, status, trial_end, past_due, reason) in cases.items():
        t = await f.tenant(
            pool,
            now,
            f"{name}-{uid}",
            plan_id,
            status=status,
            trial_end=trial_end,
            past_due_since=past_due,
        )
        decision = await engine.consume(ConsumeRequest(t, "messages", 1, "x"))
        assert decision.reason is reason, name
        assert decision.allowed is (reason is Reason.ALLOWED)
        if not decision.allowed:
            assert decision.message
    t = await f.tenant(pool, now, f"noagents-{uid}", plan)
    missing = await engine.consume(ConsumeRequest(t, probe, 1, "a"))
    assert missing.reason is Reason.RESOURCE_NOT_IN_PLAN
    assert missing.upgrade_plan_id == bigger


async def test_unknown_tenant_and_bad_input_are_errors(engine: QuotaEngine) -> None:
    with pytest.raises(NotFound):
        await engine.consume(ConsumeRequest("nobody-here", "messages", 1, "r"))
    with pytest.raises(InvalidRequest, match="amount"):
        await engine.consume(ConsumeRequest("t", "messages", 0, "r"))
    with pytest.raises(InvalidRequest, match="unknown resource"):
        await engine.consume(ConsumeRequest("t", "Messages!", 1, "r"))
    with pytest.raises(InvalidRequest, match="request_id"):
        await engine.consume(ConsumeRequest("t", "messages", 1, ""))
    with pytest.raises(InvalidRequest, match="request_id"):
        await engine.consume(ConsumeRequest("t", "messages", 1, "x" * 129))


async def test_reserve_commit_release_and_expiry(
    pool: Pool, engine: QuotaEngine, clock: FrozenClock, uid: str
) -> None:
    plan = await f.plan(pool, clock.now(), uid, [quota("research_runs", "monthly", 10)])
    t = await f.tenant(pool, clock.now(), f"t-{uid}", plan)
    r1 = await engine.reserve(ReserveRequest(t, "research_runs", 6, "res1", ttl_seconds=60))
    assert r1.allowed and r1.reservation_id and r1.windows[0].used == 6
    denied = await engine.reserve(ReserveRequest(t, "research_runs", 5, "res2"))
    assert denied.reason is Reason.QUOTA_EXCEEDED
    done = await engine.commit(CommitRequest(t, r1.reservation_id, 4))
    assert done.windows[0].used == 4 and not done.replayed
    again = await engine.commit(CommitRequest(t, r1.reservation_id, 4))
    assert again.replayed and again.usage_record_id == done.usage_record_id
    with pytest.raises(InvalidRequest):
        await engine.commit(CommitRequest(t, r1.reservation_id, 5))
    r2 = await engine.reserve(ReserveRequest(t, "research_runs", 3, "res3"))
    assert await engine.release(ReleaseRequest(t, r2.reservation_id))
    assert not await engine.release(ReleaseRequest(t, r2.reservation_id))
    with pytest.raises(Conflict):
        await engine.commit(CommitRequest(t, r2.reservation_id, 1))
    r3 = await engine.reserve(ReserveRequest(t, "research_runs", 6, "res4", ttl_seconds=30))
    assert r3.windows[0].used == 10
    clock.advance(timedelta(seconds=31))
    usage = await engine.usage(UsageRequest(t))
    assert usage.resources[0].windows[0].used == 4  # the expired hold no longer counts
    late = await engine.commit(CommitRequest(t, r3.reservation_id, 2))  # work happened: record
    assert late.windows[0].used == 6
    with pytest.raises(NotFound):
        await engine.commit(CommitRequest(t, "rsv_missing", 1))


async def test_free_lowers_a_cumulative_level(
    pool: Pool, engine: QuotaEngine, clock: FrozenClock, uid: str
) -> None:
    plan = await f.plan(pool, clock.now(), uid, [quota("agents", "cumulative", 3)])
    t = await f.tenant(pool, clock.now(), f"t-{uid}", plan)
    for i in range(3):
        assert (await engine.consume(ConsumeRequest(t, "agents", 1, f"a{i}"))).allowed
    full = await engine.consume(ConsumeRequest(t, "agents", 1, "a3"))
    assert full.reason is Reason.QUOTA_EXCEEDED and "3 in use" in full.message
    freed = await engine.free(FreeRequest(t, "agents", 2, "f1"))
    assert freed.windows[0].used == 1
    assert (await engine.free(FreeRequest(t, "agents", 2, "f1"))).replayed
    with pytest.raises(InvalidRequest, match="only 1 in use"):
        await engine.free(FreeRequest(t, "agents", 2, "f2"))
    assert (await engine.consume(ConsumeRequest(t, "agents", 2, "a4"))).allowed


async def test_token_cost_and_wallet_overage(
    pool: Pool, engine: QuotaEngine, clock: FrozenClock, uid: str
) -> None:
    now = clock.now()
    await f.price(pool, "acme", f"m-{uid}", 2_000_000, 8_000_000, now - timedelta(days=1))
    plan = await f.plan(pool, now, uid, [quota("tokens", "daily", 1000, overage="wallet")])
    t = await f.tenant(pool, now, f"t-{uid}", plan, credits_micros=10_000)
    tokens = TokenUsage("acme", f"m-{uid}", 600, 400)  # 600*2 + 400*8 = 4400 micros
    inside = await engine.consume(ConsumeRequest(t, "tokens", 1000, "c1", tokens=tokens))
    assert inside.allowed and inside.cost_micros == 4400 and inside.wallet_balance_micros == 10_000
    over = await engine.consume(ConsumeRequest(t, "tokens", 1000, "c2", tokens=tokens))
    assert over.allowed and over.wallet_balance_micros == 10_000 - 4400
    broke = await engine.consume(ConsumeRequest(t, "tokens", 1000, "c3", tokens=tokens))
    assert broke.allowed and broke.wallet_balance_micros == 10_000 - 8800
    no_money = await engine.consume(ConsumeRequest(t, "tokens", 1000, "c4", tokens=tokens))
    assert no_money.reason is Reason.INSUFFICIENT_CREDITS
    unpriced = await engine.consume(ConsumeRequest(t, "tokens", 10, "c5"))
    assert unpriced.reason is Reason.QUOTA_EXCEEDED  # past the limit, units are never free
    ledger = await f.fetch(
        pool, "SELECT sum(delta_micros) FROM wallet_ledger WHERE tenant_id = %s", t
    )
    assert ledger == [(10_000 - 8800,)]
    with pytest.raises(NotFound, match="no price"):
        await engine.consume(
            ConsumeRequest(t, "tokens", 1, "c6", tokens=TokenUsage("acme", "nope", 1, 1))
        )


async def test_an_expired_grant_stops_paying_and_is_written_off_in_the_ledger(
    pool: Pool, engine: QuotaEngine, clock: FrozenClock, uid: str
) -> None:
    now = clock.now()
    await f.price(pool, "acme", f"m-{uid}", 1_000_000, 0, now - timedelta(days=1))
    plan = await f.plan(pool, now, uid, [quota("tokens", "daily", 0, overage="wallet")])
    t = await f.tenant(pool, now, f"t-{uid}", plan)
    await f.credit(pool, t, 700, now, reason="promo", expires_at=now + timedelta(hours=1))
    await f.credit(pool, t, 300, now, reason="paid")
    tokens = TokenUsage("acme", f"m-{uid}", 100, 0)  # 100 micros
    first = await engine.consume(ConsumeRequest(t, "tokens", 1, "e1", tokens=tokens))
    assert first.allowed and first.wallet_balance_micros == 900  # the soonest-expiring pays
    clock.advance(timedelta(hours=2))
    second = await engine.consume(ConsumeRequest(t, "tokens", 1, "e2", tokens=tokens))
    assert second.allowed and second.wallet_balance_micros == 200  # 600 expired, 100 paid
    rows = await f.fetch(
        pool,
        "SELECT kind, sum(delta_micros) FROM wallet_ledger WHERE tenant_id = %s"
        " GROUP BY kind ORDER BY kind",
        t,
    )
    assert rows == [("debit", -200), ("expire", -600), ("grant", 1000)]
    [(balance,)] = await f.fetch(pool, "SELECT balance_micros FROM wallets WHERE tenant_id = %s", t)
    assert balance == 200


async def test_expired_idempotency_keys_are_swept_and_their_request_ids_count_anew(
    scratch_database: str, clock: FrozenClock
) -> None:
    """The sweep forgets keys past IDEMPOTENCY_TTL_HOURS — never a live one, nor one another
    transaction holds — and forgetting changes no answer: an expired request_id counts
    anew whether or not its key is still there."""
    pool = await open_pool(scratch_database, 2)
    try:
        engine = f.engine(pool, clock, QuotaRules())
        sweeper = Sweeper(engine, engine._store, clock)
        plan = await f.plan(pool, clock.now(), "sweep", [quota("messages", "monthly", 100)])
        t = await f.tenant(pool, clock.now(), "t-sweep", plan)
        for rid in ("old-1", "old-2", "old-3", "held"):
            assert (await engine.consume(ConsumeRequest(t, "messages", 1, rid))).allowed
        clock.advance(timedelta(hours=12))
        live = await engine.consume(ConsumeRequest(t, "messages", 1, "live"))
        clock.advance(timedelta(hours=13))  # the first four are 25 h old, "live" 13 h
        async with await AsyncConnection.connect(scratch_database) as other:
            await other.execute(
                "SELECT 1 FROM idempotency_keys WHERE request_id = 'held' FOR UPDATE"
            )
            assert await sweeper.idempotency_keys(limit=2, rounds=1) == 2  # two per transaction
            assert await sweeper.idempotency_keys(limit=2, rounds=5) == 1  # "held" skipped
            await other.rollback()
        assert await sweeper.idempotency_keys() == 1
        assert await sweeper.idempotency_keys() == 0
        kept = await f.fetch(
            pool, "SELECT request_id FROM idempotency_keys WHERE tenant_id = %s", t
        )
        assert kept == [("live",)]
        again = await engine.consume(ConsumeRequest(t, "messages", 1, "live"))
        assert again.replayed and again.usage_record_id == live.usage_record_id
        anew = await engine.consume(ConsumeRequest(t, "messages", 1, "old-1"))
        assert anew.allowed and not anew.replayed
        used = await f.fetch(pool, "SELECT sum(amount) FROM usage_records WHERE tenant_id = %s", t)
        assert used == [(6,)]
    finally:
        await pool.close()
