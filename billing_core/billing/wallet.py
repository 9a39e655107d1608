"""The wallet as people see it (balance, grants with expiry, the ledger) and credits
granted by hand. Debits and expiries are the quota engine's (billing_core/quota/core.py)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from billing_core.billing import audit
from billing_core.billing.model import GrantView, LedgerEntryView
from billing_core.billing.pages import Page, check_limit, decode_cursor, page_of
from billing_core.billing.tenants import get_tenant
from billing_core.db.unit_of_work import UnitOfWork
from billing_core.errors import InvalidRequest
from billing_core.ids import new_id


@dataclass(frozen=True, slots=True)
class WalletView:
    tenant_id: str
    balance_micros: int
    held_micros: int
    available_micros: int
    grants: tuple[GrantView, ...]
    ledger: Page[LedgerEntryView]


async def get_wallet(
    uow: UnitOfWork, tenant_id: str, now: datetime, *, limit: int = 50, cursor: str | None = None
) -> WalletView:
    """Balance as of `now` (grants past their expiry no longer count), newest ledger first."""
    check_limit(limit)
    before = decode_cursor(cursor, 1)
    await get_tenant(uow, tenant_id)
    grants = tuple(await uow.wallet.grants(tenant_id, now))
    held = await uow.wallet.held(tenant_id)
    balance = sum(g.remaining_micros for g in grants)
    entries = await uow.wallet.ledger(
        tenant_id, before=before[0] if before else None, limit=limit + 1
    )
    ledger = page_of(entries, limit, lambda e: [e.entry_id])
    return WalletView(tenant_id, balance, held, max(0, balance - held), grants, ledger)


async def credit(
    uow: UnitOfWork,
    tenant_id: str,
    amount_micros: int,
    now: datetime,
    *,
    reason: str,
    expires_at: datetime | None = None,
) -> str:
    """Add a manual grant to the tenant's wallet; its id."""
    if amount_micros <= 0:
        raise InvalidRequest("amount_micros must be > 0")
    grant_id = new_id("grant", now)
    await uow.wallet.add_grant(
        tenant_id,
        grant_id=grant_id,
        grant_key=f"manual:{grant_id}",
        source="manual",
        amount_micros=amount_micros,
        expires_at=expires_at,
        reason=reason,
        now=now,
    )
    return grant_id


async def grant(
    uow: UnitOfWork,
    actor: str,
    tenant_id: str,
    amount_micros: int,
    reason: str,
    now: datetime,
    expires_at: datetime | None = None,
) -> GrantView:
    """Credits granted by hand, with a reason, written to the audit log."""
    if not reason.strip():
        raise InvalidRequest("reason is required for a manual grant")
    if expires_at is not None and expires_at <= now:
        raise InvalidRequest("expires_at must be in the future")
    await get_tenant(uow, tenant_id, lock=True)
    grant_id = await credit(
        uow, tenant_id, amount_micros, now, reason=reason, expires_at=expires_at
    )
    view = next(g for g in await uow.wallet.grants(tenant_id, now) if g.grant_id == grant_id)
    await audit.record_tenant(uow, actor, "wallet.grant", tenant_id, None, view, now)
    return view
