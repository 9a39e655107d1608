"""The wallet as an operator sees it: balance, grants with expiry, the ledger; manual grants."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from billing_core import catalog
from billing_core.admin import audit
from billing_core.admin.pages import Page, check_limit, decode_cursor, page_of
from billing_core.admin.tenants import get_tenant
from billing_core.db.quota_store import Conn
from billing_core.errors import InvalidRequest


@dataclass(frozen=True, slots=True)
class GrantView:
    grant_id: str
    source: str
    amount_micros: int
    remaining_micros: int
    expires_at: datetime | None
    expired: bool
    reason: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class LedgerEntryView:
    entry_id: int
    grant_id: str
    kind: str
    delta_micros: int
    usage_record_id: str | None
    reason: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class WalletView:
    tenant_id: str
    balance_micros: int
    held_micros: int
    available_micros: int
    grants: tuple[GrantView, ...]
    ledger: Page[LedgerEntryView]


async def get_wallet(
    conn: Conn, tenant_id: str, now: datetime, *, limit: int = 50, cursor: str | None = None
) -> WalletView:
    """Balance as of `now` (grants past their expiry no longer count), newest ledger first."""
    check_limit(limit)
    before = decode_cursor(cursor, 1)
    await get_tenant(conn, tenant_id)
    cur = await conn.execute(
        "SELECT grant_id, source, amount_micros,"
        " CASE WHEN expired OR expires_at <= %(now)s THEN 0 ELSE remaining_micros END,"
        " expires_at, expired OR coalesce(expires_at <= %(now)s, false), reason, created_at"
        " FROM wallet_grants WHERE tenant_id = %(t)s ORDER BY created_at, grant_id",
        {"t": tenant_id, "now": now},
    )
    grants = tuple(GrantView(*row) for row in await cur.fetchall())
    cur = await conn.execute(
        "SELECT coalesce(held_micros, 0) FROM wallets WHERE tenant_id = %s", (tenant_id,)
    )
    row = await cur.fetchone()
    held = int(row[0]) if row else 0
    balance = sum(g.remaining_micros for g in grants)
    cur = await conn.execute(
        "SELECT entry_id, grant_id, kind, delta_micros, usage_record_id, reason, created_at"
        " FROM wallet_ledger WHERE tenant_id = %(t)s"
        " AND (%(before)s::bigint IS NULL OR entry_id < %(before)s)"
        " ORDER BY entry_id DESC LIMIT %(n)s",
        {"t": tenant_id, "before": before[0] if before else None, "n": limit + 1},
    )
    entries = [LedgerEntryView(*r) for r in await cur.fetchall()]
    ledger = page_of(entries, limit, lambda e: [e.entry_id])
    return WalletView(tenant_id, balance, held, max(0, balance - held), grants, ledger)


async def grant(
    conn: Conn,
    actor: str,
    tenant_id: str,
    amount_micros: int,
    reason: str,
    now: datetime,
    expires_at: datetime | None = None,
) -> GrantView:
    if not reason.strip():
        raise InvalidRequest("reason is required for a manual grant")
    if expires_at is not None and expires_at <= now:
        raise InvalidRequest("expires_at must be in the future")
    async with conn.transaction():
        await get_tenant(conn, tenant_id, lock=True)
        grant_id = await catalog.grant_credits(
            conn, tenant_id, amount_micros, now, reason=reason, expires_at=expires_at
        )
        view = next(
            g for g in (await get_wallet(conn, tenant_id, now)).grants if g.grant_id == grant_id
        )
        await audit.record_tenant(conn, actor, "wallet.grant", tenant_id, None, view, now)
    return view
