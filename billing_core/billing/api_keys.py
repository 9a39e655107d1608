"""Admin API keys: shown once, stored only as a SHA-256 hash."""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime

from billing_core.billing import audit
from billing_core.db.unit_of_work import UnitOfWork
from billing_core.ids import new_id

KEY_PREFIX = "bpk_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


async def create_api_key(
    uow: UnitOfWork, actor: str, name: str, now: datetime, key: str | None = None
) -> str:
    """Store a key (a new random one unless given) and return it; a key stored before is
    left as it is (so a configured key can be ensured at every start)."""
    key = key or KEY_PREFIX + secrets.token_urlsafe(32)
    api_key_id = new_id("key", now)
    if await uow.api_keys.insert(api_key_id, name, hash_key(key), key[:12], now):
        await audit.record(
            uow, actor=actor, action="api_key.create", entity_type="api_key",
            entity_id=api_key_id, before=None, after={"name": name, "prefix": key[:12]}, now=now,
        )  # fmt: skip
    return key


async def verify_api_key(uow: UnitOfWork, key: str) -> str | None:
    """The key's id when it is known and not revoked."""
    if not key:
        return None
    return await uow.api_keys.live_id(hash_key(key))


async def key_is_live(uow: UnitOfWork, api_key_id: str) -> bool:
    """Whether a session opened with this key still stands (the key was not revoked)."""
    return await uow.api_keys.is_live(api_key_id)
