"""Admin API keys, stored only as SHA-256 hashes."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from psycopg import AsyncConnection

from billing_core.billing.model import ApiKeyView

_VIEW = "api_key_id, name, prefix, scope, created_at, revoked_at"


class ApiKeyRepository:
    def __init__(self, conn: AsyncConnection[Any]) -> None:
        self._conn = conn

    async def insert(
        self, api_key_id: str, name: str, key_hash: str, prefix: str, scope: str, now: datetime
    ) -> ApiKeyView | None:
        """None when a key with this hash exists already."""
        cur = await self._conn.execute(
            "INSERT INTO api_keys (api_key_id, name, key_hash, prefix, scope, created_at)"
            " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (key_hash) DO NOTHING"
            f" RETURNING {_VIEW}",
            (api_key_id, name, key_hash, prefix, scope, now),
        )
        row = await cur.fetchone()
        return None if row is None else ApiKeyView(*row)

    async def live(self, key_hash: str) -> tuple[str, str] | None:
        """(id, scope) of the key with this hash, unless it was revoked."""
        cur = await self._conn.execute(
            "SELECT api_key_id, scope FROM api_keys WHERE key_hash = %s AND revoked_at IS NULL",
            (key_hash,),
        )
        row = await cur.fetchone()
        return None if row is None else (str(row[0]), str(row[1]))

    async def is_live(self, api_key_id: str) -> bool:
        """Whether the key with this id exists and was not revoked."""
        cur = await self._conn.execute(
            "SELECT 1 FROM api_keys WHERE api_key_id = %s AND revoked_at IS NULL", (api_key_id,)
        )
        return await cur.fetchone() is not None

    async def get(self, api_key_id: str, *, lock: bool = False) -> ApiKeyView | None:
        cur = await self._conn.execute(
            f"SELECT {_VIEW} FROM api_keys WHERE api_key_id = %s" + (" FOR UPDATE" if lock else ""),
            (api_key_id,),
        )
        row = await cur.fetchone()
        return None if row is None else ApiKeyView(*row)

    async def page(self, *, after: str | None, limit: int) -> list[ApiKeyView]:
        """Keys in id order (ids grow with time), revoked ones too."""
        cur = await self._conn.execute(
            f"SELECT {_VIEW} FROM api_keys WHERE %(after)s::text IS NULL"
            " OR api_key_id > %(after)s ORDER BY api_key_id LIMIT %(limit)s",
            {"after": after, "limit": limit},
        )
        return [ApiKeyView(*r) for r in await cur.fetchall()]

    async def revoke(self, api_key_id: str, now: datetime) -> ApiKeyView | None:
        cur = await self._conn.execute(
            "UPDATE api_keys SET revoked_at = %s WHERE api_key_id = %s AND revoked_at IS NULL"
            f" RETURNING {_VIEW}",
            (now, api_key_id),
        )
        row = await cur.fetchone()
        return None if row is None else ApiKeyView(*row)
