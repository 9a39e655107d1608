"""The audit log: who changed what, with the state before and after (append-only)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb

from billing_core.billing.model import AuditEntryView, AuditFilter


class AuditRepository:
    def __init__(self, conn: AsyncConnection[Any]) -> None:
        self._conn = conn

    async def record(
        self,
        *,
        actor: str,
        action: str,
        entity_type: str,
        entity_id: str,
        before: dict[str, Any] | None,
        after: dict[str, Any] | None,
        now: datetime,
    ) -> None:
        await self._conn.execute(
            "INSERT INTO audit_log (actor, action, entity_type, entity_id, before, after,"
            " created_at) VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (
                actor,
                action,
                entity_type,
                entity_id,
                None if before is None else Jsonb(before),
                None if after is None else Jsonb(after),
                now,
            ),
        )

    async def page(
        self, flt: AuditFilter, *, before: int | None, limit: int
    ) -> list[AuditEntryView]:
        """Entries matching the filter, newest first, older than the entry `before`."""
        cur = await self._conn.execute(
            "SELECT audit_id, actor, action, entity_type, entity_id, before, after, created_at"
            " FROM audit_log"
            " WHERE (%(actor)s::text IS NULL OR actor = %(actor)s)"
            " AND (%(action)s::text IS NULL OR action = %(action)s)"
            " AND (%(etype)s::text IS NULL OR entity_type = %(etype)s)"
            " AND (%(eid)s::text IS NULL OR entity_id = %(eid)s)"
            " AND (%(before)s::bigint IS NULL OR audit_id < %(before)s)"
            " ORDER BY audit_id DESC LIMIT %(n)s",
            {
                "actor": flt.actor,
                "action": flt.action,
                "etype": flt.entity_type,
                "eid": flt.entity_id,
                "before": before,
                "n": limit,
            },
        )
        return [AuditEntryView(*row) for row in await cur.fetchall()]
