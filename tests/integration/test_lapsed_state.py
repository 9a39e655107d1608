"""Lazily expiring state — reservations and grants past their expiry — stops counting at
once and is cleared by the first transaction that writes for its tenant, or by the sweep."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from billing_core.billing.model import quota
from billing_core.clock import FrozenClock
from billing_core.quota.answers import CommitResult, Decision, Tidied
from billing_core.quota.engine import QuotaRules
from billing_core.quota.requests import (
    CommitRequest,
    ConsumeRequest,
    ReserveRequest,
)
from billing_core.quota.sweeps import Sweeper
from billing_core.rules.pricing import TokenUsage
from tests import factories as f
from tests.integration.batching import Pool, without_fallback
from tests.integration.test_properties import START

MODEL = "coalesce-model"


async def test_commits_after_the_credits_behind_their_holds_expired_pay_nothing_more(
    pool: Pool, uid: str
) -> None:
    """Credits that expire while reservations hold part of them leave the wallet holding
    more than its balance: each Commit, alone or in a batch, pays what the balance allows
    (nothing), gives its hold back and does not fail."""
    clock = FrozenClock(START)
    engine = f.engine(pool, clock, QuotaRules())
    await f.price(pool, "p", MODEL, 1_000_000, 0, START)
    plan = await f.plan(pool, START, uid, [quota("tokens", "daily", 10, overage="wallet")])
    t = await f.tenant(pool, START, f"lapsed-{uid}", plan)
    await f.credit(pool, t, 1000, START, expires_at=START + timedelta(minutes=1))
    tokens = TokenUsage("p", MODEL, 100, 0)  # 100 micros for 50 tokens
    held = []
    for i in range(3):
        reserved = await engine.reserve(
            ReserveRequest(t, "tokens", 50, f"r{i}", tokens=tokens, ttl_seconds=3600)
        )
        assert reserved.allowed
        held.append(reserved.reservation_id)
    assert await f.fetch(pool, "SELECT held_micros FROM wallets WHERE tenant_id = %s", t) == [
        (80 + 100 + 100,)  # the first: 40 of its 50 tokens over the daily 10
    ]
    clock.advance(timedelta(minutes=2))  # the grant expired: the wallet holds 280 of 0
    alone = await engine.commit(CommitRequest(t, held[0], 50, tokens))  # expires the grant

    without_fallback(engine)
    [batched] = await engine.run_batch([CommitRequest(t, held[1], 50, tokens)])
    assert alone.wallet_balance_micros == 0
    assert isinstance(batched, CommitResult) and batched.wallet_balance_micros == 0
    wallet = await f.fetch(
        pool, "SELECT balance_micros, held_micros FROM wallets WHERE tenant_id = %s", t
    )
    assert wallet == [(0, 100)]  # the last reservation's hold is still there
    charged = await f.fetch(
        pool,
        "SELECT wallet_charged_micros, over_limit FROM usage_records WHERE tenant_id = %s",
        t,
    )
    assert charged == [(0, True), (0, True)]  # not paid: marked as over the limit


async def test_a_transaction_clears_the_lapsed_state_of_the_tenants_it_writes_for(
    pool: Pool, uid: str
) -> None:
    """A grant and a reservation (of another resource) past their expiry: a dry run leaves
    them out of its counts and writes nothing; the next batch that writes for the tenant
    expires the grant (its remainder leaves the balance with a ledger entry) and releases
    the reservation, in its own transaction, without falling back; the sweep finds nothing
    left."""
    clock = FrozenClock(START)
    engine = f.engine(pool, clock, QuotaRules())
    plan = await f.plan(
        pool, START, uid, [quota("messages", "daily", 100), quota("files", "overall", 10)]
    )
    t = await f.tenant(pool, START, f"lapsed-{uid}", plan, credits_micros=500)
    await f.credit(pool, t, 300, START, reason="trial", expires_at=START + timedelta(hours=1))
    held = await engine.reserve(ReserveRequest(t, "files", 4, f"{uid}-r", ttl_seconds=60))
    assert held.allowed
    clock.advance(timedelta(hours=2))  # both lapsed
    without_fallback(engine)

    [probe] = await engine.run_batch([ConsumeRequest(t, "files", 10, "probe", dry_run=True)])
    assert isinstance(probe, Decision) and probe.allowed  # the expired 4 no longer count
    files = await f.fetch(
        pool,
        "SELECT r.status, c.used, c.reserved FROM reservations r JOIN usage_counters c"
        " ON c.tenant_id = r.tenant_id AND c.resource = r.resource WHERE r.tenant_id = %s",
        t,
    )
    assert files == [("active", 0, 4)]  # the dry run wrote nothing

    results = await engine.run_batch([ConsumeRequest(t, "messages", 1, f"m{i}") for i in range(3)])
    assert [r.windows[0].used for r in results if isinstance(r, Decision)] == [1, 2, 3]
    files = await f.fetch(
        pool,
        "SELECT r.status, c.used, c.reserved FROM reservations r JOIN usage_counters c"
        " ON c.tenant_id = r.tenant_id AND c.resource = r.resource WHERE r.tenant_id = %s",
        t,
    )
    assert files == [("expired", 0, 0)]
    wallet = await f.fetch(
        pool, "SELECT balance_micros, held_micros FROM wallets WHERE tenant_id = %s", t
    )
    assert wallet == [(500, 0)]
    expired = await f.fetch(
        pool,
        "SELECT delta_micros, reason FROM wallet_ledger WHERE tenant_id = %s AND kind = 'expire'",
        t,
    )
    assert expired == [(-300, "grant expired")]
    sweeper = Sweeper(engine, engine_store(engine), clock)
    assert await sweeper.lapsed(tenant_ids=[t]) == Tidied(0, 0)


async def test_the_sweep_clears_the_lapsed_state_of_tenants_no_call_reaches(
    pool: Pool, uid: str
) -> None:
    """The sweep releases every reservation past its expiry and expires every grant past
    its expiry, once, the remainder leaving the balance with one ledger entry; live grants,
    grants without expiry and live reservations stay. (A call that writes for a tenant
    clears its lapsed state on the way: the sweep then finds nothing of it.)"""
    clock = FrozenClock(START)
    engine = f.engine(pool, clock, QuotaRules())
    sweeper = Sweeper(engine, engine_store(engine), clock)
    plan = await f.plan(pool, START, uid, [quota("messages", "daily", 100)])
    a = await f.tenant(pool, START, f"sweep-a-{uid}", plan, credits_micros=1000)
    b = await f.tenant(pool, START, f"sweep-b-{uid}", plan)
    soon, later = START + timedelta(hours=1), START + timedelta(days=30)
    for tenant, micros, expires in ((a, 200, soon), (a, 300, later), (b, 50, soon)):
        await f.credit(pool, tenant, micros, START, reason="t", expires_at=expires)
    await engine.reserve(ReserveRequest(b, "messages", 5, "short", ttl_seconds=60))
    await engine.reserve(ReserveRequest(a, "messages", 7, "long", ttl_seconds=3600))
    assert await sweeper.lapsed(tenant_ids=[a, b]) == Tidied(0, 0)  # nothing is due yet
    clock.advance(timedelta(minutes=30))
    assert await sweeper.lapsed(tenant_ids=[b]) == Tidied(1, 0)  # the reservation only
    await engine.reserve(ReserveRequest(a, "messages", 3, "live", ttl_seconds=3600))
    clock.advance(timedelta(minutes=45))  # the grants due soon and a's long hold lapsed
    assert await sweeper.lapsed(tenant_ids=[b]) == Tidied(0, 1)
    assert await sweeper.lapsed(tenant_ids=[a, b]) == Tidied(1, 1)  # a's; b's is done
    assert await sweeper.lapsed(tenant_ids=[a, b]) == Tidied(0, 0)
    grants = await f.fetch(
        pool,
        "SELECT tenant_id = %s, amount_micros, remaining_micros, expired FROM wallet_grants"
        " WHERE tenant_id IN (%s, %s) ORDER BY 1 DESC, 2",
        a,
        a,
        b,
    )
    assert grants == [
        (True, 200, 0, True),
        (True, 300, 300, False),
        (True, 1000, 1000, False),
        (False, 50, 0, True),
    ]
    books = await f.fetch(
        pool,
        "SELECT w.balance_micros, (SELECT sum(delta_micros) FROM wallet_ledger l"
        " WHERE l.tenant_id = w.tenant_id), (SELECT array_agg(delta_micros) FROM wallet_ledger l"
        " WHERE l.tenant_id = w.tenant_id AND kind = 'expire')"
        " FROM wallets w WHERE tenant_id IN (%s, %s) ORDER BY tenant_id = %s DESC",
        a,
        b,
        a,
    )
    assert books == [(1300, 1300, [-200]), (0, 0, [-50])]
    reservations = await f.fetch(
        pool,
        "SELECT r.request_id, r.status, c.reserved FROM reservations r JOIN usage_counters c"
        " ON c.tenant_id = r.tenant_id AND c.resource = r.resource"
        " WHERE r.tenant_id IN (%s, %s) ORDER BY 1",
        a,
        b,
    )
    assert reservations == [("live", "active", 3), ("long", "expired", 3), ("short", "expired", 0)]


def engine_store(engine: Any) -> Any:
    """The store the test engine decides through (the sweeper shares it)."""
    return engine._store
