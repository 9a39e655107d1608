"""Wallets: grants (credited once per grant key), the ledger, and the balance and holds."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from psycopg import AsyncConnection

from billing_core.billing.model import GrantView, LedgerEntryView


class WalletRepository:
    def __init__(self, conn: AsyncConnection[Any]) -> None:
        self._conn = conn

    async def add_grant(
        self,
        tenant_id: str,
        *,
        grant_id: str,
        grant_key: str,
        source: str,
        amount_micros: int,
        expires_at: datetime | None,
        reason: str,
        now: datetime,
    ) -> bool:
        """Credit a grant once per grant_key, with its ledger entry, under the wallet's lock
        (the wallet is created if missing); False when that key was granted before."""
        await self._conn.execute(
            "INSERT INTO wallets AS w (tenant_id, updated_at) VALUES (%s, %s)"
            " ON CONFLICT (tenant_id) DO UPDATE SET updated_at = w.updated_at",
            (tenant_id, now),
        )
        cur = await self._conn.execute(
            "INSERT INTO wallet_grants (tenant_id, grant_id, grant_key, source, amount_micros,"
            " remaining_micros, expires_at, reason, created_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (tenant_id, grant_key) DO NOTHING RETURNING 1",
            (tenant_id, grant_id, grant_key, source, amount_micros, amount_micros, expires_at,
             reason, now),
        )  # fmt: skip
        if await cur.fetchone() is None:
            return False
        await self._conn.execute(
            "INSERT INTO wallet_ledger (tenant_id, grant_id, kind, delta_micros, reason,"
            " created_at) VALUES (%s, %s, 'grant', %s, %s, %s)",
            (tenant_id, grant_id, amount_micros, reason, now),
        )
        await self._conn.execute(
            "UPDATE wallets SET balance_micros = balance_micros + %s, updated_at = %s"
            " WHERE tenant_id = %s",
            (amount_micros, now, tenant_id),
        )
        return True

    async def grants(self, tenant_id: str, now: datetime) -> list[GrantView]:
        """Every grant, oldest first; one past its expiry pays nothing more."""
        cur = await self._conn.execute(
            "SELECT grant_id, source, amount_micros,"
            " CASE WHEN expired OR expires_at <= %(now)s THEN 0 ELSE remaining_micros END,"
            " expires_at, expired OR coalesce(expires_at <= %(now)s, false), reason, created_at"
            " FROM wallet_grants WHERE tenant_id = %(t)s ORDER BY created_at, grant_id",
            {"t": tenant_id, "now": now},
        )
        return [GrantView(*row) for row in await cur.fetchall()]

    async def held(self, tenant_id: str) -> int:
        """What live reservations hold on the wallet."""
        cur = await self._conn.execute(
            "SELECT held_micros FROM wallets WHERE tenant_id = %s", (tenant_id,)
        )
        row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def ledger(
        self, tenant_id: str, *, before: int | None, limit: int
    ) -> list[LedgerEntryView]:
        """Ledger entries, newest first, older than the entry `before`."""
        cur = await self._conn.execute(
            "SELECT entry_id, grant_id, kind, delta_micros, usage_record_id, reason, created_at"
            " FROM wallet_ledger WHERE tenant_id = %(t)s"
            " AND (%(before)s::bigint IS NULL OR entry_id < %(before)s)"
            " ORDER BY entry_id DESC LIMIT %(n)s",
            {"t": tenant_id, "before": before, "n": limit},
        )
        return [LedgerEntryView(*r) for r in await cur.fetchall()]
