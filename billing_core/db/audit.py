"""The audit log: who changed what, with the state before and after (append-only)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb


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
