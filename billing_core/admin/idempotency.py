"""Stored responses of money-moving admin calls, replayed for the same Idempotency-Key."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from psycopg.types.json import Jsonb

from billing_core.db.quota_store import Conn
from billing_core.errors import InvalidRequest

MAX_KEY = 255


async def claim(
    conn: Conn, owner: str, key: str, request_hash: str
) -> tuple[int, dict[str, Any]] | None:
    """Serialize calls with this key (inside the caller's transaction); the stored
    (status, body) when the key was used before with the same request."""
    if not key or len(key) > MAX_KEY or "\x00" in key:
        raise InvalidRequest(f"Idempotency-Key must be 1-{MAX_KEY} characters")
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (f"{owner}\x1f{key}",)
    )
    cur = await conn.execute(
        "SELECT request_hash, status_code, response_body FROM http_idempotency_keys"
        " WHERE api_key_id = %s AND idempotency_key = %s",
        (owner, key),
    )
    row = await cur.fetchone()
    if row is None:
        return None
    stored_hash, status, body = row
    if stored_hash != request_hash:
        raise InvalidRequest(
            "Idempotency-Key was already used for a different request; use a new key"
        )
    return int(status), body


async def remember(
    conn: Conn,
    owner: str,
    key: str,
    request_hash: str,
    status: int,
    body: dict[str, Any],
    now: datetime,
) -> None:
    await conn.execute(
        "INSERT INTO http_idempotency_keys (api_key_id, idempotency_key, request_hash,"
        " status_code, response_body, created_at) VALUES (%s, %s, %s, %s, %s, %s)",
        (owner, key, request_hash, status, Jsonb(body), now),
    )
