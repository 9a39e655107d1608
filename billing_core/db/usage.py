"""Usage records (read; the quota engine writes them) and notifications."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from billing_core.billing.model import NotificationView, RecordFilter
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
