"""Stored responses of the control plane's money-moving calls, by Idempotency-Key."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb


class HttpKeyRepository:
    def __init__(self, conn: AsyncConnection[Any]) -> None:
        self._conn = conn

    async def lock(self, owner: str, key: str) -> tuple[str, int, dict[str, Any]] | None:
        """Serialize the calls with this key until the transaction ends; the stored
        (request_hash, status, body) when the key was used before."""
        await self._conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (f"{owner}\x1f{key}",)
        )
        cur = await self._conn.execute(
            "SELECT request_hash, status_code, response_body FROM http_idempotency_keys"
            " WHERE api_key_id = %s AND idempotency_key = %s",
            (owner, key),
        )
        row = await cur.fetchone()
        return None if row is None else (str(row[0]), int(row[1]), row[2])

    async def insert(
        self,
        owner: str,
        key: str,
        request_hash: str,
        status: int,
        body: dict[str, Any],
        now: datetime,
    ) -> None:
        await self._conn.execute(
            "INSERT INTO http_idempotency_keys (api_key_id, idempotency_key, request_hash,"
            " status_code, response_body, created_at) VALUES (%s, %s, %s, %s, %s, %s)",
            (owner, key, request_hash, status, Jsonb(body), now),
        )
