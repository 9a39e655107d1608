"""Usage records (filtered, paginated, streamed for export) and notifications."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg_pool import AsyncConnectionPool

from billing_core.admin.pages import Page, check_limit, decode_cursor, page_of
from billing_core.admin.tenants import get_tenant
from billing_core.db.quota_store import Conn
from billing_core.errors import InvalidRequest
from billing_core.resources import validate_resource

RECORD_FIELDS = (
    "usage_record_id",
    "occurred_at",
    "resource",
    "amount",
    "kind",
    "request_id",
    "reservation_id",
    "plan_id",
    "provider",
    "model",
    "input_tokens",
    "output_tokens",
    "cost_micros",
    "wallet_charged_micros",
    "over_limit",
    "labels",
)
_SELECT = (
    f"SELECT {', '.join(RECORD_FIELDS)} FROM usage_records WHERE tenant_id = %(t)s"
    " AND (%(resource)s::text IS NULL OR resource = %(resource)s)"
    " AND (%(since)s::timestamptz IS NULL OR occurred_at >= %(since)s)"
    " AND (%(until)s::timestamptz IS NULL OR occurred_at < %(until)s)"
)


@dataclass(frozen=True, slots=True)
class UsageRecordView:
    usage_record_id: str
    occurred_at: datetime
    resource: str
    amount: int
    kind: str
    request_id: str | None
    reservation_id: str | None
    plan_id: str | None
    provider: str | None
    model: str | None
    input_tokens: int
    output_tokens: int
    cost_micros: int
    wallet_charged_micros: int
    over_limit: bool
    labels: dict[str, Any]


@dataclass(frozen=True, slots=True)
class RecordFilter:
    tenant_id: str
    resource: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def params(self) -> dict[str, Any]:
        if self.resource is not None:
            validate_resource(self.resource)
        if self.since and self.until and self.since >= self.until:
            raise InvalidRequest("since must be before until")
        return {
            "t": self.tenant_id,
            "resource": self.resource,
            "since": self.since,
            "until": self.until,
        }


async def list_records(
    conn: Conn, flt: RecordFilter, *, limit: int, cursor: str | None
) -> Page[UsageRecordView]:
    """Oldest first, keyed by (occurred_at, usage_record_id)."""
    check_limit(limit)
    params = flt.params()
    after = decode_cursor(cursor, 2)
    await get_tenant(conn, flt.tenant_id)
    try:
        after_at = datetime.fromisoformat(after[0]) if after else None
    except (TypeError, ValueError):
        raise InvalidRequest("cursor is not one this API returned") from None
    cur = await conn.execute(
        _SELECT + " AND (%(after_at)s::timestamptz IS NULL"
        " OR (occurred_at, usage_record_id) > (%(after_at)s, %(after_id)s))"
        " ORDER BY occurred_at, usage_record_id LIMIT %(n)s",
        {**params, "after_at": after_at, "after_id": after[1] if after else None, "n": limit + 1},
    )
    rows = [UsageRecordView(*r) for r in await cur.fetchall()]
    return page_of(rows, limit, lambda r: [r.occurred_at.isoformat(), r.usage_record_id])


async def stream_records(
    pool: AsyncConnectionPool[Any], flt: RecordFilter, chunk: int = 2000
) -> AsyncIterator[tuple[Any, ...]]:
    """Every matching record, oldest first, through a server-side cursor: memory stays
    constant however many records there are. Validate (and 404) before streaming."""
    params = flt.params()
    async with pool.connection() as conn, conn.transaction():
        cur = conn.cursor(name="usage_export")
        await cur.execute(_SELECT + " ORDER BY occurred_at, usage_record_id", params)
        while rows := await cur.fetchmany(chunk):
            for row in rows:
                yield tuple(row)
        await cur.close()


@dataclass(frozen=True, slots=True)
class NotificationView:
    notification_id: int
    kind: str
    message: str
    details: dict[str, Any]
    created_at: datetime


async def list_notifications(
    conn: Conn, tenant_id: str, *, limit: int, cursor: str | None
) -> Page[NotificationView]:
    """Newest first."""
    check_limit(limit)
    before = decode_cursor(cursor, 1)
    await get_tenant(conn, tenant_id)
    cur = await conn.execute(
        "SELECT notification_id, kind, message, details, created_at FROM notifications"
        " WHERE tenant_id = %(t)s AND (%(before)s::bigint IS NULL OR notification_id < %(before)s)"
        " ORDER BY notification_id DESC LIMIT %(n)s",
        {"t": tenant_id, "before": before[0] if before else None, "n": limit + 1},
    )
    rows = [NotificationView(*r) for r in await cur.fetchall()]
    return page_of(rows, limit, lambda n: [n.notification_id])
