"""The database as the use cases see it: `Database` owns the connection pools and opens
units of work; a `UnitOfWork` is one transaction with a repository per aggregate on it.

    async with database.transaction() as uow:
        plan = await uow.plans.get("pro")
        await uow.audit.record(...)
    # committed; an exception rolls everything back
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from billing_core.db.api_keys import ApiKeyRepository
from billing_core.db.audit import AuditRepository
from billing_core.db.http_keys import HttpKeyRepository
from billing_core.db.plans import PlanRepository
from billing_core.db.pool import open_pool, ping
from billing_core.db.prices import PriceRepository
from billing_core.db.quota_sql import plan_settings
from billing_core.db.quota_store import PgQuotaStore
from billing_core.db.tenants import TenantRepository
from billing_core.db.usage import UsageRepository
from billing_core.db.wallet import WalletRepository
from billing_core.db.webhook_events import WebhookEventRepository
from billing_core.errors import InvalidRequest, Unavailable


class UnitOfWork:
    """One transaction; every repository works on it."""

    def __init__(self, conn: AsyncConnection[Any]) -> None:
        self.plans = PlanRepository(conn)
        self.tenants = TenantRepository(conn)
        self.wallet = WalletRepository(conn)
        self.prices = PriceRepository(conn)
        self.usage = UsageRepository(conn)
        self.webhook_events = WebhookEventRepository(conn)
        self.audit = AuditRepository(conn)
        self.api_keys = ApiKeyRepository(conn)
        self.http_keys = HttpKeyRepository(conn)


class Database:
    """The shared pool and, for the sidecar, the coalescing lanes' own."""

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        *,
        batch_pool: AsyncConnectionPool[Any] | None = None,
        acquire_timeout_s: float = 2.0,
        session_lock_timeouts: tuple[int, int] | None = None,
        prepared: bool = True,
        generic_plans: bool = True,
    ) -> None:
        self.pool = pool
        self.batch_pool = batch_pool
        self._acquire_timeout_s = acquire_timeout_s
        self.quota_store = PgQuotaStore(
            pool,
            batch_pool=batch_pool,
            acquire_timeout_s=acquire_timeout_s,
            session_lock_timeouts=session_lock_timeouts,
            prepared=prepared,
            generic_plans=generic_plans,
        )

    @classmethod
    async def open(
        cls,
        url: str,
        size: int,
        *,
        batch_size: int = 0,
        acquire_timeout_s: float = 2.0,
        quota_only: bool = False,
        batch_lock_timeout_ms: int = 0,
        prepared: bool = True,
        generic_plans: bool = True,
    ) -> Database:
        """Open the pools (`batch_size` connections kept for batches, when > 0).
        `quota_only`: the connections serve the quota engine alone (the sidecar), so its
        plan settings, and the batches' lock timeout, are made once per connection.
        `prepared=False` (behind a pooler in transaction mode, where a connection is not a
        session): no prepared statements and no session settings — each transaction sends
        its own. `generic_plans=False`: the quota statements are planned with their values
        each time (tables partitioned or distributed by tenant)."""
        if not quota_only or not prepared:
            pool = await open_pool(url, size, prepared=prepared)
            batch_pool = (
                await open_pool(url, batch_size, prepared=prepared) if batch_size > 0 else None
            )
            return cls(
                pool, batch_pool=batch_pool, acquire_timeout_s=acquire_timeout_s,
                prepared=prepared, generic_plans=generic_plans,
            )  # fmt: skip
        plans = plan_settings(generic=generic_plans)
        batch_session = {**plans, "lock_timeout": str(batch_lock_timeout_ms)}
        pool = await open_pool(url, size, session={**plans, "lock_timeout": "0"})
        batch_pool = (
            await open_pool(url, batch_size, session=batch_session) if batch_size > 0 else None
        )
        return cls(
            pool,
            batch_pool=batch_pool,
            acquire_timeout_s=acquire_timeout_s,
            session_lock_timeouts=(0, batch_lock_timeout_ms),
            generic_plans=generic_plans,
        )

    @asynccontextmanager
    async def transaction(self, *, timeout_s: float = 5.0) -> AsyncIterator[UnitOfWork]:
        """A unit of work: committed when the block ends, rolled back on an exception.
        The database's own failures leave as the domain's errors: Unavailable when it
        cannot be reached, InvalidRequest for a value it cannot take."""
        try:
            async with self.pool.connection(timeout=timeout_s) as conn, conn.transaction():
                yield UnitOfWork(conn)
        except (psycopg.OperationalError, PoolTimeout, TimeoutError) as exc:
            raise Unavailable("the database is unavailable; retry later") from exc
        except psycopg.DataError as exc:
            # a value PostgreSQL cannot take (out of range, bad encoding) is the caller's
            raise InvalidRequest(f"a value is out of range: {type(exc).__name__}") from exc

    async def ping(self) -> bool:
        """True when a pooled connection answers in time."""
        return await ping(self.pool, self._acquire_timeout_s)

    async def schema_revision(self) -> str | None:
        """The migration the database is at (None when it cannot be read)."""
        try:
            async with self.pool.connection(timeout=2.0) as conn:
                cur = await conn.execute("SELECT version_num FROM alembic_version")
                row = await cur.fetchone()
        except Exception:
            return None
        return None if row is None else str(row[0])

    async def close(self) -> None:
        if self.batch_pool is not None:
            await self.batch_pool.close()
        await self.pool.close()
