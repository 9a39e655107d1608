"""Admin API keys, stored only as SHA-256 hashes."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from psycopg import AsyncConnection


class ApiKeyRepository:
    def __init__(self, conn: AsyncConnection[Any]) -> None:
        self._conn = conn

    async def insert(
        self, api_key_id: str, name: str, key_hash: str, prefix: str, now: datetime
    ) -> bool:
        """False when a key with this hash exists already."""
        cur = await self._conn.execute(
            "INSERT INTO api_keys (api_key_id, name, key_hash, prefix, created_at)"
            " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (key_hash) DO NOTHING RETURNING 1",
            (api_key_id, name, key_hash, prefix, now),
        )
        return await cur.fetchone() is not None

    async def live_id(self, key_hash: str) -> str | None:
        """The id of the key with this hash, unless it was revoked."""
        cur = await self._conn.execute(
            "SELECT api_key_id FROM api_keys WHERE key_hash = %s AND revoked_at IS NULL",
            (key_hash,),
        )
        row = await cur.fetchone()
        return None if row is None else str(row[0])

    async def is_live(self, api_key_id: str) -> bool:
        """Whether the key with this id exists and was not revoked."""
        cur = await self._conn.execute(
            "SELECT 1 FROM api_keys WHERE api_key_id = %s AND revoked_at IS NULL", (api_key_id,)
        )
        return await cur.fetchone() is not None
