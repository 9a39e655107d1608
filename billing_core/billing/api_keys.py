"""Admin API keys: shown once, stored only as a SHA-256 hash; an `admin` key may do
everything, a `read` key only read; a revoked key (and every session opened with it)
stops working at once."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime

from billing_core.billing import audit
from billing_core.billing.model import ApiKeyView
from billing_core.billing.pages import Page, check_limit, decode_cursor, page_of
from billing_core.db.unit_of_work import UnitOfWork
from billing_core.errors import Conflict, InvalidRequest, NotFound
from billing_core.ids import new_id

KEY_PREFIX = "bpk_"
SCOPES = ("admin", "read")


@dataclass(frozen=True, slots=True)
class Caller:
    """Who a valid key belongs to, and what it may do."""

    api_key_id: str
    scope: str

    @property
    def may_change(self) -> bool:
        return self.scope == "admin"


@dataclass(frozen=True, slots=True)
class IssuedKey:
    key: str  # shown this once
    view: ApiKeyView


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


async def create_api_key(
    uow: UnitOfWork,
    actor: str,
    name: str,
    now: datetime,
    key: str | None = None,
    *,
    scope: str = "admin",
) -> IssuedKey:
    """Store a key (a new random one unless given) and return it; a given key stored
    before is left as it is (so a configured key can be ensured at every start)."""
    if scope not in SCOPES:
        raise InvalidRequest(f"scope must be one of {', '.join(SCOPES)}")
    if not name.strip() or len(name) > 128:
        raise InvalidRequest("a key needs a name of 1 to 128 characters")
    key = key or KEY_PREFIX + secrets.token_urlsafe(32)
    view = await uow.api_keys.insert(new_id("key", now), name, hash_key(key), key[:12], scope, now)
    if view is None:
        existing = await uow.api_keys.live(hash_key(key))
        if existing is None:
            raise Conflict("this key was revoked: it cannot be registered again")
        found = await uow.api_keys.get(existing[0])
        assert found is not None
        return IssuedKey(key, found)
    await audit.record(
        uow,
        actor=actor,
        action="api_key.create",
        entity_type="api_key",
        entity_id=view.api_key_id,
        before=None,
        after={"name": name, "prefix": view.prefix, "scope": scope},
        now=now,
    )
    return IssuedKey(key, view)


async def verify_api_key(uow: UnitOfWork, key: str) -> Caller | None:
    """The caller a key stands for when it is known and not revoked."""
    if not key:
        return None
    found = await uow.api_keys.live(hash_key(key))
    return None if found is None else Caller(*found)


async def key_is_live(uow: UnitOfWork, api_key_id: str) -> bool:
    """Whether a session opened with this key still stands (the key was not revoked)."""
    return await uow.api_keys.is_live(api_key_id)


async def list_api_keys(uow: UnitOfWork, *, limit: int, cursor: str | None) -> Page[ApiKeyView]:
    """Every key ever issued, oldest first, without its secret."""
    check_limit(limit)
    after = decode_cursor(cursor, 1)
    rows = await uow.api_keys.page(after=str(after[0]) if after else None, limit=limit + 1)
    return page_of(rows, limit, lambda k: [k.api_key_id])


async def revoke_api_key(uow: UnitOfWork, actor: str, api_key_id: str, now: datetime) -> ApiKeyView:
    """Revoke a key at once (again: nothing changes); in the audit log."""
    current = await uow.api_keys.get(api_key_id, lock=True)
    if current is None:
        raise NotFound(f"unknown API key {api_key_id!r}")
    if current.revoked_at is not None:
        return current
    if api_key_id == actor:
        raise Conflict(
            "a key cannot revoke itself: revoke it with another admin key or with "
            "`python -m control_plane revoke-api-key`"
        )
    revoked = await uow.api_keys.revoke(api_key_id, now)
    assert revoked is not None
    await audit.record(
        uow,
        actor=actor,
        action="api_key.revoke",
        entity_type="api_key",
        entity_id=api_key_id,
        before={"revoked_at": None},
        after={"revoked_at": now.isoformat()},
        now=now,
    )
    return revoked
