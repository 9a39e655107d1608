"""Money-moving control-plane calls replayed by Idempotency-Key: the same key with the same
request gets the first response again; with another request it is refused."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from billing_core.db.unit_of_work import UnitOfWork
from billing_core.errors import InvalidRequest

MAX_KEY = 255


async def claim(
    uow: UnitOfWork, owner: str, key: str, request_hash: str
) -> tuple[int, dict[str, Any]] | None:
    """Serialize calls with this key (inside the caller's unit of work); the stored
    (status, body) when the key was used before with the same request."""
    if not key or len(key) > MAX_KEY or "\x00" in key:
        raise InvalidRequest(f"Idempotency-Key must be 1-{MAX_KEY} characters")
    stored = await uow.http_keys.lock(owner, key)
    if stored is None:
        return None
    stored_hash, status, body = stored
    if stored_hash != request_hash:
        raise InvalidRequest(
            "Idempotency-Key was already used for a different request; use a new key"
        )
    return status, body


async def remember(
    uow: UnitOfWork,
    owner: str,
    key: str,
    request_hash: str,
    status: int,
    body: dict[str, Any],
    now: datetime,
) -> None:
    await uow.http_keys.insert(owner, key, request_hash, status, body, now)
