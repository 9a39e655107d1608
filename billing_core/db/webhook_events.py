"""Provider webhook events: stored first by event id, then their processing outcome."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb

from billing_core.billing.model import StoredEvent
from billing_core.billing.provider import BillingEvent

_COLUMNS = "event_id, type, status, attempts, last_error, received_at, processed_at"


class WebhookEventRepository:
    def __init__(self, conn: AsyncConnection[Any]) -> None:
        self._conn = conn

    async def store(self, event: BillingEvent, now: datetime) -> None:
        """Keep the event unless it is known already."""
        await self._conn.execute(
            "INSERT INTO stripe_webhook_events (event_id, type, payload, status, attempts,"
            " stripe_created_at, received_at) VALUES (%s, %s, %s, 'received', 0, %s, %s)"
            " ON CONFLICT (event_id) DO NOTHING",
            (event.event_id, event.type, Jsonb(dict(event.payload)), event.created, now),
        )

    async def lock_status(self, event_id: str) -> str | None:
        cur = await self._conn.execute(
            "SELECT status FROM stripe_webhook_events WHERE event_id = %s FOR UPDATE",
            (event_id,),
        )
        row = await cur.fetchone()
        return None if row is None else str(row[0])

    async def finish(self, event_id: str, status: str, now: datetime) -> None:
        """The event was processed (or ignored): one more attempt, no error."""
        await self._conn.execute(
            "UPDATE stripe_webhook_events SET status = %s, attempts = attempts + 1,"
            " last_error = NULL, processed_at = %s WHERE event_id = %s",
            (status, now, event_id),
        )

    async def fail(self, event_id: str, error: str) -> None:
        await self._conn.execute(
            "UPDATE stripe_webhook_events SET status = 'failed', attempts = attempts + 1,"
            " last_error = %s WHERE event_id = %s",
            (error[:2000], event_id),
        )

    async def stale(self, received_before: datetime, limit: int) -> list[dict[str, Any]]:
        """Payloads of events stored before `received_before` and never finished (their
        process died between storing and applying them), oldest first."""
        cur = await self._conn.execute(
            "SELECT payload FROM stripe_webhook_events WHERE status = 'received'"
            " AND received_at < %s ORDER BY received_at LIMIT %s",
            (received_before, limit),
        )
        return [r[0] if isinstance(r[0], dict) else json.loads(r[0]) for r in await cur.fetchall()]

    async def page(self, *, status: str | None, after: str | None, limit: int) -> list[StoredEvent]:
        cur = await self._conn.execute(
            f"SELECT {_COLUMNS} FROM stripe_webhook_events"
            " WHERE (%(status)s::text IS NULL OR status = %(status)s)"
            " AND (%(after)s::text IS NULL OR event_id > %(after)s) ORDER BY event_id LIMIT %(n)s",
            {"status": status, "after": after, "n": limit},
        )
        return [StoredEvent(*r) for r in await cur.fetchall()]

    async def get(self, event_id: str) -> tuple[StoredEvent, dict[str, Any]] | None:
        """The event and its payload as it came."""
        cur = await self._conn.execute(
            f"SELECT {_COLUMNS}, payload FROM stripe_webhook_events WHERE event_id = %s",
            (event_id,),
        )
        row = await cur.fetchone()
        if row is None:
            return None
        payload = row[7] if isinstance(row[7], dict) else json.loads(row[7])
        return StoredEvent(*row[:7]), payload
