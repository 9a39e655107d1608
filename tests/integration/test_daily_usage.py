"""The chart's days (usage.daily_usage) against the records summed directly: the same at
every moment, however often and however concurrently the pages ask, while the rollup
reads only the last minutes' records once it has caught up."""

from __future__ import annotations

import asyncio
import secrets
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg_pool import AsyncConnectionPool

from billing_core.billing import usage
from billing_core.billing.model import DayOfUsage
from billing_core.clock import FrozenClock
from billing_core.db.unit_of_work import Database
from billing_core.quota.requests import ConsumeRequest
from billing_core.rules.limits import Quota
from billing_core.rules.resources import Period
from tests import factories

ZONE = "Asia/Kolkata"  # +05:30: local days do not start on a UTC hour
START = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
QUOTAS = [Quota("messages", Period.MONTHLY, 10**9), Quota("tool_calls", Period.MONTHLY, 10**9)]


async def _naive(pool: AsyncConnectionPool[Any], tenant: str, now: datetime) -> list[DayOfUsage]:
    """The last 30 local days summed straight from every record."""
    rows = await factories.fetch(
        pool,
        "SELECT resource, (occurred_at AT TIME ZONE %s)::date, sum(amount)::bigint,"
        " sum(cost_micros)::bigint FROM usage_records WHERE tenant_id = %s GROUP BY 1, 2",
        ZONE,
        tenant,
    )
    today = now.astimezone(ZoneInfo(ZONE)).date()
    first = today - timedelta(days=29)
    return sorted((DayOfUsage(r, d, a, c) for r, d, a, c in rows if first <= d <= today), key=_key)


async def _chart(pool: AsyncConnectionPool[Any], tenant: str, now: datetime) -> list[DayOfUsage]:
    async with Database(pool).transaction() as uow:
        return sorted(await usage.daily_usage(uow, tenant, ZONE, now), key=_key)


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    steps=st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=3 * 24 * 60),  # minutes on
            st.sampled_from(["messages", "tool_calls"]),
            st.integers(min_value=1, max_value=50),
            st.booleans(),  # a page is viewed after this step
        ),
        min_size=1,
        max_size=25,
    )
)
async def test_the_chart_always_equals_the_records_summed(
    pool: AsyncConnectionPool[Any], uid: str, steps: list[tuple[int, str, int, bool]]
) -> None:
    clock = FrozenClock(START)
    tenant = f"daily-{uid}-{secrets.token_hex(4)}"  # every example a tenant of its own
    plan = await factories.plan(pool, START, tenant, QUOTAS)
    await factories.tenant(pool, START, tenant, plan, timezone=ZONE)
    engine = factories.engine(pool, clock)
    for n, (minutes, resource, amount, view) in enumerate(steps):
        clock.advance(timedelta(minutes=minutes))
        done = await engine.consume(ConsumeRequest(tenant, resource, amount, f"r{n}"))
        assert done.allowed
        if view:
            assert await _chart(pool, tenant, clock.now()) == await _naive(
                pool, tenant, clock.now()
            )
    clock.advance(timedelta(days=1))
    assert await _chart(pool, tenant, clock.now()) == await _naive(pool, tenant, clock.now())


async def test_caught_up_it_reads_only_the_last_minutes_and_concurrent_views_add_once(
    pool: AsyncConnectionPool[Any], uid: str
) -> None:
    clock = FrozenClock(START)
    tenant = f"caught-{uid}"
    plan = await factories.plan(pool, START, tenant, QUOTAS)
    await factories.tenant(pool, START, tenant, plan, timezone=ZONE)
    engine = factories.engine(pool, clock)
    for n in range(48):  # two days, a record an hour
        await engine.consume(ConsumeRequest(tenant, "messages", 2, f"h{n}"))
        clock.advance(timedelta(hours=1))
    now = clock.now()
    # eight pages at once: one sums, the others wait for it and add nothing twice
    views = await asyncio.gather(*(_chart(pool, tenant, now) for _ in range(8)))
    expected = await _naive(pool, tenant, now)
    assert all(v == expected for v in views)
    marks = await factories.fetch(
        pool, "SELECT day, summed_until FROM usage_daily_marks WHERE tenant_id = %s", tenant
    )
    assert len(marks) == 30
    today = now.astimezone(ZoneInfo(ZONE)).date()
    assert dict(marks)[today] == now - usage.SETTLES_AFTER  # today summed as it goes
    assert all(until == _end(day) for day, until in marks if day < today)

    # five minutes on: nothing new to sum, the marks stay (a view writes nothing)
    clock.advance(timedelta(minutes=5))
    await engine.consume(ConsumeRequest(tenant, "messages", 7, "late"))
    assert await _chart(pool, tenant, clock.now()) == await _naive(pool, tenant, clock.now())
    assert (
        await factories.fetch(
            pool, "SELECT day, summed_until FROM usage_daily_marks WHERE tenant_id = %s", tenant
        )
        == marks
    )


def _key(d: DayOfUsage) -> tuple[str, date]:
    return d.resource, d.day


def _end(day: date) -> datetime:
    return datetime.combine(day + timedelta(days=1), datetime.min.time(), tzinfo=ZoneInfo(ZONE))
