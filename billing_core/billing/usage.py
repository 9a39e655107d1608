"""Usage records (filtered, paginated, streamed for export) and notifications."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import date, datetime, time, timedelta, tzinfo

from billing_core.billing.model import DayOfUsage, NotificationView, RecordFilter
from billing_core.billing.pages import Page, check_limit, decode_cursor, page_of
from billing_core.billing.tenants import get_tenant
from billing_core.db.unit_of_work import Database, UnitOfWork
from billing_core.db.usage import stream_records
from billing_core.errors import InvalidRequest
from billing_core.quota.model import UsageRecord
from billing_core.rules.periods import tenant_zone

# records are summed for good once they are this old: a transaction that decided a call
# may commit its record a moment after the time it carries
SETTLES_AFTER = timedelta(minutes=10)


async def list_records(
    uow: UnitOfWork, flt: RecordFilter, *, limit: int, cursor: str | None
) -> Page[UsageRecord]:
    """Oldest first, keyed by (occurred_at, usage_record_id)."""
    check_limit(limit)
    flt.validate()
    after = decode_cursor(cursor, 2)
    await get_tenant(uow, flt.tenant_id)
    try:
        after_key = (datetime.fromisoformat(after[0]), str(after[1])) if after else None
    except (TypeError, ValueError):
        raise InvalidRequest("cursor is not one this API returned") from None
    rows = await uow.usage.records(flt, after=after_key, limit=limit + 1)
    return page_of(rows, limit, lambda r: [r.occurred_at.isoformat(), r.usage_record_id])


async def export_records(db: Database, flt: RecordFilter) -> AsyncIterator[UsageRecord]:
    """Every matching record, oldest first, in constant memory. The filter and the tenant
    are checked before the first record, so a bad export fails before it starts."""
    flt.validate()
    async with db.transaction() as uow:
        await get_tenant(uow, flt.tenant_id)
    return stream_records(db.pool, flt)


async def list_notifications(
    uow: UnitOfWork, tenant_id: str, *, limit: int, cursor: str | None
) -> Page[NotificationView]:
    """Newest first."""
    check_limit(limit)
    before = decode_cursor(cursor, 1)
    await get_tenant(uow, tenant_id)
    rows = await uow.usage.notifications(tenant_id, before=before[0] if before else None,
                                         limit=limit + 1)  # fmt: skip
    return page_of(rows, limit, lambda n: [n.notification_id])


async def latest_records(uow: UnitOfWork, tenant_id: str, limit: int = 10) -> list[UsageRecord]:
    """The tenant's newest usage records."""
    await get_tenant(uow, tenant_id)
    return await uow.usage.latest(tenant_id, limit)


async def daily_usage(
    uow: UnitOfWork, tenant_id: str, timezone: str, now: datetime, days: int = 30
) -> list[DayOfUsage]:
    """The last `days` days of usage (today included), per resource and day in the tenant's
    timezone. The days are summed from the records once, as they go (usage_daily, up to
    each day's mark); a call reads those rows and the records of the last minutes, never
    the history, and sums more only when the marks have fallen behind."""
    zone = tenant_zone(timezone)
    today = now.astimezone(zone).date()
    first = today - timedelta(days=days - 1)
    kept, marks = await uow.usage.summed_days(tenant_id, first, today)
    summed = _summed_through(marks, first, today, zone)
    cut = now - SETTLES_AFTER  # every record before this is written
    if summed < cut - SETTLES_AFTER:
        await uow.usage.lock_rollup(tenant_id)
        kept, marks = await uow.usage.summed_days(tenant_id, first, today)  # now, locked
        summed = _summed_through(marks, first, today, zone)
        if summed < cut:
            added = await uow.usage.sum_days(tenant_id, summed, cut, timezone)
            day, moved = summed.astimezone(zone).date(), {}
            while day <= today and _midnight(day, zone) < cut:
                moved[day] = min(_midnight(day, zone, 1), cut)
                day += timedelta(days=1)
            await uow.usage.add_days(tenant_id, added, moved)
            kept, summed = kept + added, cut
    recent = await uow.usage.sum_days(tenant_id, summed, now + timedelta(days=1), timezone)
    totals: dict[tuple[str, date], tuple[int, int]] = {}
    for d in (*kept, *recent):
        if first <= d.day <= today:
            amount, cost = totals.get((d.resource, d.day), (0, 0))
            totals[d.resource, d.day] = (amount + d.amount, cost + d.cost_micros)
    return [DayOfUsage(r, day, a, c) for (r, day), (a, c) in sorted(totals.items())]


def _summed_through(marks: dict[date, datetime], first: date, last: date, zone: tzinfo) -> datetime:
    """The moment up to which every record since `first` began is in usage_daily."""
    day = first
    while day <= last:
        end = _midnight(day, zone, 1)
        mark = marks.get(day)
        if mark is None:
            return _midnight(day, zone)
        if mark < end:
            return mark
        day += timedelta(days=1)
    return _midnight(last, zone, 1)


def _midnight(day: date, zone: tzinfo, plus_days: int = 0) -> datetime:
    """When the local day starts, as an instant."""
    return datetime.combine(day + timedelta(days=plus_days), time.min, tzinfo=zone)
