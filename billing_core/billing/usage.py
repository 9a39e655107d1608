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

# a day is summed for good once it has been over this long: a transaction that decided a
# call just before midnight may commit its record just after
DAY_SETTLES_AFTER = timedelta(minutes=10)


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
    timezone. Completed days are summed from the records once and kept (usage_daily);
    afterwards only the records of the days not yet settled are read, never the history."""
    zone = tenant_zone(timezone)
    today = now.astimezone(zone).date()
    first = today - timedelta(days=days - 1)
    settled = today - timedelta(days=1 if now - _midnight(today, zone) >= DAY_SETTLES_AFTER else 2)
    found = await uow.usage.summed_days(tenant_id, first, settled) if settled >= first else []
    have = {d.day for d in found}
    missing = [
        day for n in range((settled - first).days + 1) if (day := first + timedelta(n)) not in have
    ]
    if missing:
        summed = await uow.usage.sum_days(
            tenant_id, _midnight(missing[0], zone), _midnight(missing[-1], zone, 1), timezone
        )
        fresh = [d for d in summed if d.day in set(missing)]
        # an empty day is kept too (resource ''): it is not summed again
        await uow.usage.keep_days(tenant_id, fresh + [DayOfUsage("", d, 0, 0) for d in missing])
        found += fresh
    since = _midnight(max(settled, first - timedelta(1)), zone, 1)
    found += await uow.usage.sum_days(tenant_id, since, now + timedelta(days=1), timezone)
    return sorted((d for d in found if d.resource), key=lambda d: (d.resource, d.day))


def _midnight(day: date, zone: tzinfo, plus_days: int = 0) -> datetime:
    """When the local day starts, as an instant."""
    return datetime.combine(day + timedelta(days=plus_days), time.min, tzinfo=zone)
