"""Usage records (filtered, paginated, streamed for export) and notifications."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime

from billing_core.billing.model import NotificationView, RecordFilter
from billing_core.billing.pages import Page, check_limit, decode_cursor, page_of
from billing_core.billing.tenants import get_tenant
from billing_core.db.unit_of_work import Database, UnitOfWork
from billing_core.db.usage import stream_records
from billing_core.errors import InvalidRequest
from billing_core.quota.model import UsageRecord


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
