"""The audit log: who changed what, with the state before and after."""

from __future__ import annotations

import json
from dataclasses import asdict, is_dataclass
from datetime import datetime
from enum import Enum
from typing import Any

from psycopg.types.json import Jsonb

from billing_core.db.quota_store import Conn


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot put {type(value).__name__} in the audit log")


def snapshot(value: Any) -> dict[str, Any] | None:
    """A JSON-safe copy of a view (dataclass) or mapping, for the before/after columns."""
    if value is None:
        return None
    loaded: dict[str, Any] = json.loads(
        json.dumps(_plain(value) if is_dataclass(value) else value, default=_plain)
    )
    return loaded


async def record(
    conn: Conn,
    *,
    actor: str,
    action: str,
    entity_type: str,
    entity_id: str,
    before: Any,
    after: Any,
    now: datetime,
) -> None:
    await conn.execute(
        "INSERT INTO audit_log (actor, action, entity_type, entity_id, before, after, created_at)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s)",
        (
            actor,
            action,
            entity_type,
            entity_id,
            _json(snapshot(before)),
            _json(snapshot(after)),
            now,
        ),
    )


def _json(value: dict[str, Any] | None) -> Jsonb | None:
    return None if value is None else Jsonb(value)


async def record_tenant(
    conn: Conn, actor: str, action: str, tenant_id: str, before: Any, after: Any, now: datetime
) -> None:
    """A change to one tenant (its subscription, overrides, wallet)."""
    await record(
        conn,
        actor=actor,
        action=action,
        entity_type="tenant",
        entity_id=tenant_id,
        before=before,
        after=after,
        now=now,
    )
