"""Usage records (read; the quota engine writes them) and notifications."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import date, datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from billing_core.billing.model import DayOfUsage, NotificationView, RecordFilter
from billing_core.quota.model import RECORD_FIELDS, UsageRecord

_SELECT = (
    f"SELECT {', '.join(RECORD_FIELDS)} FROM usage_records WHERE tenant_id = %(t)s"
    " AND (%(resource)s::text IS NULL OR resource = %(resource)s)"
    " AND (%(since)s::timestamptz IS NULL OR occurred_at >= %(since)s)"
    " AND (%(until)s::timestamptz IS NULL OR occurred_at < %(until)s)"
)


def _params(flt: RecordFilter) -> dict[str, Any]:
    return {"t": flt.tenant_id, "resource": flt.resource, "since": flt.since, "until": flt.until}


class UsageRepository:
    def __init__(self, conn: AsyncConnection[Any]) -> None:
        self._conn = conn

    async def records(
        self, flt: RecordFilter, *, after: tuple[datetime, str] | None, limit: int
    ) -> list[UsageRecord]:
        """Oldest first, keyed by (occurred_at, usage_record_id), after the key `after`."""
        cur = await self._conn.execute(
            _SELECT + " AND (%(after_at)s::timestamptz IS NULL"
            " OR (occurred_at, usage_record_id) > (%(after_at)s, %(after_id)s))"
            " ORDER BY occurred_at, usage_record_id LIMIT %(n)s",
            {
                **_params(flt),
                "after_at": after[0] if after else None,
                "after_id": after[1] if after else None,
                "n": limit,
            },
        )
        return [UsageRecord(*r) for r in await cur.fetchall()]

    async def latest(self, tenant_id: str, limit: int) -> list[UsageRecord]:
        """The newest records (through the tenant-and-time index)."""
        cur = await self._conn.execute(
            f"SELECT {', '.join(RECORD_FIELDS)} FROM usage_records WHERE tenant_id = %s"
            " ORDER BY occurred_at DESC, usage_record_id DESC LIMIT %s",
            (tenant_id, limit),
        )
        return [UsageRecord(*r) for r in await cur.fetchall()]

    async def summed_days(
        self, tenant_id: str, first: date, last: date
    ) -> tuple[list[DayOfUsage], dict[date, datetime]]:
        """The rows of the days from `first` to `last` summed so far, and how far each day
        is summed (its mark; a day without one is not summed at all)."""
        cur = await self._conn.execute(
            "SELECT resource, day, amount, cost_micros FROM usage_daily"
            " WHERE tenant_id = %s AND day BETWEEN %s AND %s ORDER BY day, resource",
            (tenant_id, first, last),
        )
        rows = [DayOfUsage(*r) for r in await cur.fetchall()]
        cur = await self._conn.execute(
            "SELECT day, summed_until FROM usage_daily_marks"
            " WHERE tenant_id = %s AND day BETWEEN %s AND %s",
            (tenant_id, first, last),
        )
        return rows, {day: until for day, until in await cur.fetchall()}

    async def lock_rollup(self, tenant_id: str) -> None:
        """One transaction at a time sums this tenant's days (until this one ends)."""
        await self._conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
            (f"usage_daily\x1f{tenant_id}",),
        )

    async def sum_days(
        self, tenant_id: str, since: datetime, until: datetime, timezone: str
    ) -> list[DayOfUsage]:
        """The records from `since` to `until` summed per resource and local day."""
        cur = await self._conn.execute(
            "SELECT resource, (occurred_at AT TIME ZONE %(tz)s)::date AS day,"
            " sum(amount)::bigint, sum(cost_micros)::bigint FROM usage_records"
            " WHERE tenant_id = %(t)s AND occurred_at >= %(since)s AND occurred_at < %(until)s"
            " GROUP BY 1, 2 ORDER BY 2, 1",
            {"t": tenant_id, "tz": timezone, "since": since, "until": until},
        )
        return [DayOfUsage(*r) for r in await cur.fetchall()]

    async def add_days(
        self, tenant_id: str, sums: Sequence[DayOfUsage], marks: Mapping[date, datetime]
    ) -> None:
        """Add sums to the days' rows and move the days' marks (under lock_rollup: the
        sums must be of the records between the old marks and the new)."""
        if sums:
            await self._conn.execute(
                "INSERT INTO usage_daily AS d (tenant_id, resource, day, amount, cost_micros)"
                " SELECT %s, r, day, a, c FROM unnest(%s::text[], %s::date[], %s::bigint[],"
                " %s::bigint[]) AS u(r, day, a, c) ON CONFLICT (tenant_id, resource, day)"
                " DO UPDATE SET amount = d.amount + excluded.amount,"
                " cost_micros = d.cost_micros + excluded.cost_micros",
                (
                    tenant_id,
                    [d.resource for d in sums],
                    [d.day for d in sums],
                    [d.amount for d in sums],
                    [d.cost_micros for d in sums],
                ),
            )
        if marks:
            await self._conn.execute(
                "INSERT INTO usage_daily_marks (tenant_id, day, summed_until)"
                " SELECT %s, day, until FROM unnest(%s::date[], %s::timestamptz[])"
                " AS u(day, until) ON CONFLICT (tenant_id, day)"
                " DO UPDATE SET summed_until = excluded.summed_until",
                (tenant_id, list(marks), list(marks.values())),
            )

    async def notifications(
        self, tenant_id: str, *, before: int | None, limit: int
    ) -> list[NotificationView]:
        """Newest first, older than the notification `before`."""
        cur = await self._conn.execute(
            "SELECT notification_id, kind, message, details, created_at FROM notifications"
            " WHERE tenant_id = %(t)s"
            " AND (%(before)s::bigint IS NULL OR notification_id < %(before)s)"
            " ORDER BY notification_id DESC LIMIT %(n)s",
            {"t": tenant_id, "before": before, "n": limit},
        )
        return [NotificationView(*r) for r in await cur.fetchall()]

    async def notify(
        self,
        tenant_id: str,
        notes: Sequence[tuple[str, str, str, dict[str, Any]]],
        now: datetime,
    ) -> None:
        """(kind, dedupe_key, message, details) each; a dedupe_key is recorded once."""
        for kind, key, message, details in notes:
            await self._conn.execute(
                "INSERT INTO notifications (tenant_id, kind, dedupe_key, message, details,"
                " created_at) VALUES (%s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (tenant_id, dedupe_key) DO NOTHING",
                (tenant_id, kind, key, message, Jsonb(details), now),
            )


async def stream_records(
    pool: AsyncConnectionPool[Any], flt: RecordFilter, chunk: int = 2000
) -> AsyncIterator[UsageRecord]:
    """Every matching record, oldest first, through a server-side cursor on a connection
    of its own: memory stays constant however many records there are."""
    async with pool.connection() as conn, conn.transaction():
        cur = conn.cursor(name="usage_export")
        await cur.execute(_SELECT + " ORDER BY occurred_at, usage_record_id", _params(flt))
        while rows := await cur.fetchmany(chunk):
            for row in rows:
                yield UsageRecord(*row)
        await cur.close()
