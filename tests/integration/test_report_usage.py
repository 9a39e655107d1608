"""ReportUsage: fail-open usage counted afterwards — never denied, into the windows of its
moment, once per request_id (also when the CheckAndConsume it stands for was counted)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool

from billing_core.billing.model import quota
from billing_core.clock import FrozenClock
from billing_core.errors import InvalidRequest, NotFound
from billing_core.quota.engine import QuotaEngine
from billing_core.quota.requests import ConsumeRequest, ReportRequest
from billing_core.rules.limits import WindowState
from billing_core.rules.pricing import TokenUsage
from tests import factories as f

Pool = AsyncConnectionPool[Any]


async def _books(pool: Pool, tenant: str) -> list[tuple[Any, ...]]:
    """Each daily counter beside the records of its window."""
    return await f.fetch(
        pool,
        "SELECT c.window_start, c.used, (SELECT coalesce(sum(r.amount), 0) FROM usage_records r"
        "  WHERE r.tenant_id = c.tenant_id AND r.resource = c.resource"
        "  AND r.occurred_at >= c.window_start AND r.occurred_at < c.window_start + interval"
        "  '1 day') FROM usage_counters c WHERE c.tenant_id = %s AND c.period = 'daily'"
        " ORDER BY 1",
        tenant,
    )


async def test_reported_usage_is_never_denied_and_counts_in_its_own_window(
    pool: Pool, engine: QuotaEngine, clock: FrozenClock, uid: str
) -> None:
    now = clock.now()  # 12:00 UTC
    plan = await f.plan(pool, now, uid, [quota("messages", "daily", 10)])
    t = await f.tenant(pool, now, f"t-{uid}", plan)
    assert (await engine.consume(ConsumeRequest(t, "messages", 10, "c1"))).allowed
    late = await engine.report(ReportRequest(t, "messages", 5, "offline-1", now))
    assert not late.replayed and late.usage_record_id
    assert [(w.used, w.state) for w in late.windows] == [(15, WindowState.EXHAUSTED)]
    yesterday = await engine.report(
        ReportRequest(t, "messages", 3, "offline-2", now - timedelta(hours=13))
    )
    assert [w.used for w in yesterday.windows] == [3]  # yesterday's window, not today's
    rows = await f.fetch(
        pool,
        "SELECT request_id, kind, over_limit, wallet_charged_micros, occurred_at"
        " FROM usage_records WHERE tenant_id = %s AND kind = 'fail_open' ORDER BY occurred_at",
        t,
    )
    assert rows == [
        ("offline-2", "fail_open", False, 0, now - timedelta(hours=13)),
        ("offline-1", "fail_open", True, 0, now),
    ]
    books = await _books(pool, t)
    assert [(used, summed) for _, used, summed in books] == [(3, 3), (15, 15)]
    # the next CheckAndConsume sees the reported usage
    assert not (await engine.consume(ConsumeRequest(t, "messages", 1, "c2"))).allowed


async def test_a_report_counts_once_whatever_came_before(
    pool: Pool, engine: QuotaEngine, clock: FrozenClock, uid: str
) -> None:
    now = clock.now()
    plan = await f.plan(pool, now, uid, [quota("tokens", "daily", 1_000_000)])
    t = await f.tenant(pool, now, f"t-{uid}", plan)
    await f.price(pool, "p", f"m-{uid}", 1_000_000, 2_000_000, now - timedelta(days=1))
    tokens = TokenUsage("p", f"m-{uid}", 300, 100)
    report = ReportRequest(t, "tokens", 400, "r1", now, tokens, {"job": "a"})
    first = await engine.report(report)
    again = await engine.report(report)
    assert again.replayed and again.usage_record_id == first.usage_record_id
    assert first.cost_micros == 300 + 200  # estimated like any record
    with pytest.raises(InvalidRequest, match="already used"):
        await engine.report(ReportRequest(t, "tokens", 401, "r1", now, tokens, {"job": "a"}))
    # the CheckAndConsume was counted after all (only its answer was lost): not again
    counted = await engine.consume(ConsumeRequest(t, "tokens", 50, "lost-answer"))
    echo = await engine.report(ReportRequest(t, "tokens", 50, "lost-answer", now))
    assert echo.replayed and echo.usage_record_id == counted.usage_record_id
    # a request_id used for something else is refused, and counts nothing
    with pytest.raises(InvalidRequest, match="already used"):
        await engine.report(ReportRequest(t, "tokens", 60, "lost-answer", now))
    [(total,)] = await f.fetch(
        pool, "SELECT sum(amount) FROM usage_records WHERE tenant_id = %s", t
    )
    assert total == 450


async def test_reports_that_cannot_be_counted_safely_are_refused(
    pool: Pool, engine: QuotaEngine, clock: FrozenClock, uid: str
) -> None:
    now = clock.now()
    plan = await f.plan(pool, now, uid, [quota("messages", "daily", 10)])
    t = await f.tenant(pool, now, f"t-{uid}", plan)
    for at, message in (
        (now + timedelta(minutes=6), "in the future"),
        (now - timedelta(hours=25), "no longer be checked for duplicates"),
        (now.replace(tzinfo=None), "occurred_at is required"),
    ):
        with pytest.raises(InvalidRequest, match=message):
            await engine.report(ReportRequest(t, "messages", 1, f"bad-{at}", at))
    with pytest.raises(NotFound):
        await engine.report(ReportRequest(f"nobody-{uid}", "messages", 1, "x", now))
    assert await f.fetch(pool, "SELECT 1 FROM usage_records WHERE tenant_id = %s", t) == []
