"""Admin API keys: shown once, stored only as a SHA-256 hash."""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime

from billing_core.db.quota_store import Conn
from billing_core.ids import new_id

KEY_PREFIX = "bpk_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


async def create_api_key(conn: Conn, name: str, now: datetime, key: str | None = None) -> str:
    """Store a key (a new random one unless given) and return it; idempotent for a given key."""
    key = key or KEY_PREFIX + secrets.token_urlsafe(32)
    await conn.execute(
        "INSERT INTO api_keys (api_key_id, name, key_hash, prefix, created_at)"
        " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (key_hash) DO NOTHING",
        (new_id("key", now), name, hash_key(key), key[:12], now),
    )
    return key


async def verify_api_key(conn: Conn, key: str) -> str | None:
    """The key's id when it is known and not revoked."""
    if not key:
        return None
    cur = await conn.execute(
        "SELECT api_key_id FROM api_keys WHERE key_hash = %s AND revoked_at IS NULL",
        (hash_key(key),),
    )
    row = await cur.fetchone()
    return None if row is None else str(row[0])
