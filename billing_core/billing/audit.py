"""Audit entries: who changed what, with JSON snapshots of the state before and after,
written in the unit of work of the change itself."""

from __future__ import annotations

import json
from dataclasses import asdict, is_dataclass
from datetime import datetime
from enum import Enum
from typing import Any

from billing_core.billing.model import AuditEntryView, AuditFilter
from billing_core.billing.pages import Page, check_limit, decode_cursor, page_of
from billing_core.db.unit_of_work import UnitOfWork


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot put {type(value).__name__} in the audit log")


def snapshot(value: Any) -> dict[str, Any] | None:
    """A JSON-safe copy of a view (dataclass) or mapping, for the before/after columns."""
    if value is None:
        return None
    loaded: dict[str, Any] = json.loads(
        json.dumps(_plain(value) if is_dataclass(value) else value, default=_plain)
    )
    return loaded


async def record(
    uow: UnitOfWork,
    *,
    actor: str,
    action: str,
    entity_type: str,
    entity_id: str,
    before: Any,
    after: Any,
    now: datetime,
) -> None:
    await uow.audit.record(
        actor=actor,
        action=action,
        entity_type=entity_type,
        entity_id=entity_id,
        before=snapshot(before),
        after=snapshot(after),
        now=now,
    )


async def record_tenant(
    uow: UnitOfWork, actor: str, action: str, tenant_id: str, before: Any, after: Any, now: datetime
) -> None:
    """A change to one tenant (its subscription, overrides, wallet)."""
    await record(
        uow,
        actor=actor,
        action=action,
        entity_type="tenant",
        entity_id=tenant_id,
        before=before,
        after=after,
        now=now,
    )


async def list_entries(
    uow: UnitOfWork, flt: AuditFilter, *, limit: int, cursor: str | None
) -> Page[AuditEntryView]:
    """The audit log, newest first, filtered."""
    check_limit(limit)
    before = decode_cursor(cursor, 1)
    rows = await uow.audit.page(flt, before=before[0] if before else None, limit=limit + 1)
    return page_of(rows, limit, lambda e: [e.audit_id])
