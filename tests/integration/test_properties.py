"""Property tests on real PostgreSQL: random interleavings of consume / reserve / commit /
release / free / retries / clock ticks / sweeps keep the books exact.

After every generated run:
- each counter's `used` equals the sum of the usage records that fall in its window;
- each counter's `reserved` equals the live reservations that hold it;
- no blocking window ever holds more than its limit (used + live reservations);
- wallet balance == sum(ledger) >= 0, held == sum of the holds of active reservations,
  and every debit in the ledger is a usage record's wallet charge;
- copies of one request (same request_id, sent at once) get one answer.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg_pool import AsyncConnectionPool

from billing_core.billing.model import quota
from billing_core.clock import FrozenClock
from billing_core.errors import Conflict, InvalidRequest
from billing_core.quota.engine import QuotaEngine, QuotaRules
from billing_core.quota.requests import (
    CommitRequest,
    ConsumeRequest,
    FreeRequest,
    ReleaseRequest,
    ReserveRequest,
)
from billing_core.quota.sweeps import Sweeper
from billing_core.rules.periods import tenant_zone, window_for
from billing_core.rules.pricing import TokenUsage
from billing_core.rules.resources import Period
from tests import factories as f

Pool = AsyncConnectionPool[Any]
START = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
MODEL = "prop-model"
LIMITS = {("tokens", "daily"): 50, ("tokens", "monthly"): 120, ("agents", "cumulative"): 5}
BLOCKING = {("tokens", "monthly"), ("agents", "cumulative")}
_run_ids = itertools.count()


@dataclass(frozen=True)
class Consume:
    resource: str
    amount: int
    copies: int  # 1 = sent once; 2-3 = a retry storm with the same request_id


@dataclass(frozen=True)
class Reserve:
    amount: int
    ttl_seconds: int
    copies: int


@dataclass(frozen=True)
class Commit:
    which: int  # index into the reservations made so far
    percent: int  # actual amount = reserved amount * percent / 100 (at least 1)
    copies: int


@dataclass(frozen=True)
class Release:
    which: int


@dataclass(frozen=True)
class Free:
    amount: int
    copies: int


@dataclass(frozen=True)
class Tick:
    seconds: int


@dataclass(frozen=True)
class Sweep:
    pass


Op = Consume | Reserve | Commit | Release | Free | Tick | Sweep
copies = st.integers(1, 3)
ops = st.one_of(
    st.builds(Consume, st.sampled_from(["tokens", "agents"]), st.integers(1, 12), copies),
    st.builds(Reserve, st.integers(1, 15), st.sampled_from([30, 600, 3600]), copies),
    st.builds(Commit, st.integers(0, 20), st.integers(1, 100), copies),
    st.builds(Release, st.integers(0, 20)),
    st.builds(Free, st.integers(1, 3), copies),
    st.builds(Tick, st.sampled_from([59, 3600, 6 * 3600, 86_400])),
    st.builds(Sweep),
)
# operations run in groups; a group's operations run concurrently
groups = st.lists(st.lists(ops, min_size=1, max_size=4), min_size=1, max_size=8)


async def setup_plan(pool: Pool) -> str:
    await f.price(pool, "prop", MODEL, 1_000_000, 0, START - timedelta(days=1))
    return await f.plan(
        pool,
        START,
        f"prop-{next(_run_ids)}",
        [
            quota("tokens", "daily", LIMITS["tokens", "daily"], overage="wallet"),
            quota("tokens", "monthly", LIMITS["tokens", "monthly"]),
            quota("agents", "cumulative", LIMITS["agents", "cumulative"]),
        ],
    )


class Runner:
    def __init__(self, pool: Pool, engine: QuotaEngine, clock: FrozenClock, tenant: str) -> None:
        self.pool, self.engine, self.clock, self.tenant = pool, engine, clock, tenant
        self.sweeper = Sweeper(engine, engine._store, clock)
        self.reservations: list[str] = []
        self.seq = itertools.count()

    def tokens(self, amount: int) -> TokenUsage:
        return TokenUsage("prop", MODEL, amount * 3, 0)  # 3 micros per unit

    async def same_answer(self, copies: int, make: Any) -> None:
        """Send `copies` identical calls at once. Whatever succeeded is one answer, applied
        once (others are replays). A denial or an error stores nothing, so a copy that ran
        before a concurrent Free/Release may be denied while a later copy is allowed."""
        results = await asyncio.gather(*(make() for _ in range(copies)), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, InvalidRequest | Conflict):
                raise r
        applied = [
            r for r in results if not isinstance(r, BaseException) and getattr(r, "allowed", True)
        ]
        assert len({_without_replayed(r) for r in applied}) <= 1, f"different answers: {results}"
        assert sum(not r.replayed for r in applied) <= 1, f"applied twice: {results}"

    async def run(self, op: Op) -> None:
        t = self.tenant
        match op:
            case Consume(resource, amount, n):
                req = ConsumeRequest(
                    t,
                    resource,
                    amount,
                    f"c{next(self.seq)}",
                    tokens=self.tokens(amount) if resource == "tokens" else None,
                )
                await self.same_answer(n, lambda: self.engine.consume(req))
            case Reserve(amount, ttl, n):
                rreq = ReserveRequest(
                    t,
                    "tokens",
                    amount,
                    f"r{next(self.seq)}",
                    tokens=self.tokens(amount),
                    ttl_seconds=ttl,
                )
                decisions = await asyncio.gather(*(self.engine.reserve(rreq) for _ in range(n)))
                made = {d.reservation_id for d in decisions if d.allowed}
                assert len(made) <= 1, f"one request made several reservations: {made}"
                assert sum(d.allowed and not d.replayed for d in decisions) == len(made)
                self.reservations.extend(made)
            case Commit(which, percent, n) if which < len(self.reservations):
                rid = self.reservations[which]
                reserved = await reserved_amount(self.pool, t, rid)
                actual = max(1, reserved * percent // 100)
                creq = CommitRequest(t, rid, actual, tokens=self.tokens(actual))
                await self.same_answer(n, lambda: self.engine.commit(creq))
            case Release(which) if which < len(self.reservations):
                await self.engine.release(ReleaseRequest(t, self.reservations[which]))
            case Free(amount, n):
                freq = FreeRequest(t, "agents", amount, f"f{next(self.seq)}")
                await self.same_answer(n, lambda: self.engine.free(freq))
            case Tick(seconds):
                self.clock.advance(timedelta(seconds=seconds))
            case Sweep():
                await self.sweeper.lapsed()
                await self.sweeper.idempotency_keys()
            case _:
                pass  # a commit/release of a reservation that was never made


def _without_replayed(result: Any) -> Any:
    data = result.to_json()
    data.pop("replayed", None)
    return repr(sorted(data.items()))


async def reserved_amount(pool: Pool, tenant: str, reservation_id: str) -> int:
    [(amount,)] = await f.fetch(
        pool,
        "SELECT amount FROM reservations WHERE tenant_id = %s AND reservation_id = %s",
        tenant,
        reservation_id,
    )
    return int(amount)


async def check_books(pool: Pool, tenant: str, now: datetime) -> None:
    [(anchor,)] = await f.fetch(
        pool,
        "SELECT coalesce(billing_cycle_anchor, created_at) FROM subscriptions WHERE tenant_id = %s",
        tenant,
    )
    zone = tenant_zone("UTC")
    records = await f.fetch(
        pool,
        "SELECT resource, amount, occurred_at FROM usage_records WHERE tenant_id = %s",
        tenant,
    )
    expected_used: dict[tuple[str, str, datetime], int] = {}
    for resource, amount, at in records:
        for (res, period), _limit in LIMITS.items():
            if res == resource:
                start = window_for(Period(period), at, zone, anchor).start
                key = (res, period, start)
                expected_used[key] = expected_used.get(key, 0) + amount
    reservations = await f.fetch(
        pool,
        "SELECT amount, windows, status, expires_at, held_micros FROM reservations"
        " WHERE tenant_id = %s",
        tenant,
    )
    expected_reserved: dict[tuple[str, str, datetime], int] = {}
    live_reserved: dict[tuple[str, str, datetime], int] = {}
    for amount, windows, status, expires_at, _held in reservations:
        if status != "active":
            continue
        for w in windows:
            key = ("tokens", w["period"], datetime.fromisoformat(w["window_start"]))
            expected_reserved[key] = expected_reserved.get(key, 0) + amount
            if expires_at > now:
                live_reserved[key] = live_reserved.get(key, 0) + amount
    counters = await f.fetch(
        pool,
        "SELECT resource, period, window_start, used, reserved FROM usage_counters"
        " WHERE tenant_id = %s",
        tenant,
    )
    seen = {(r, p, s): (u, rv) for r, p, s, u, rv in counters}
    for key in expected_used.keys() | expected_reserved.keys() | seen.keys():
        used, reserved = seen.get(key, (0, 0))
        assert used == expected_used.get(key, 0), f"{key}: used {used} != records"
        assert reserved == expected_reserved.get(key, 0), f"{key}: reserved {reserved}"
        resource, period, _ = key
        if (resource, period) in BLOCKING:
            assert used + live_reserved.get(key, 0) <= LIMITS[resource, period], key
    [(balance, held, ledger_sum, debits)] = await f.fetch(
        pool,
        "SELECT coalesce(w.balance_micros, 0), coalesce(w.held_micros, 0),"
        " (SELECT coalesce(sum(delta_micros), 0) FROM wallet_ledger l"
        "   WHERE l.tenant_id = t.tenant_id),"
        " (SELECT coalesce(-sum(delta_micros), 0) FROM wallet_ledger l"
        "   WHERE l.tenant_id = t.tenant_id AND kind = 'debit')"
        " FROM tenants t LEFT JOIN wallets w USING (tenant_id) WHERE t.tenant_id = %s",
        tenant,
    )
    assert balance == ledger_sum >= 0
    assert held == sum(h for _, _, status, _, h in reservations if status == "active")
    [(charged,)] = await f.fetch(
        pool,
        "SELECT coalesce(sum(wallet_charged_micros), 0) FROM usage_records WHERE tenant_id = %s",
        tenant,
    )
    assert debits == charged


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(plan_groups=groups, credits=st.sampled_from([0, 40, 400]))
async def test_random_interleavings_keep_the_books_exact(
    pool: Pool, plan_groups: list[list[Op]], credits: int
) -> None:
    clock = FrozenClock(START)
    engine = f.engine(pool, clock, QuotaRules(), acquire_timeout_s=30)
    plan = await setup_plan(pool)
    tenant = await f.tenant(pool, START, f"prop-t-{next(_run_ids)}", plan, credits_micros=credits)
    runner = Runner(pool, engine, clock, tenant)
    for group in plan_groups:
        work: list[Awaitable[None]] = [runner.run(op) for op in group]
        await asyncio.gather(*work)
        await check_books(pool, tenant, clock.now())
