"""Async connection pools for the hot path (psycopg 3, autocommit + explicit transactions)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from billing_core.db.urls import libpq_url


async def open_pool(
    database_url: str,
    size: int,
    *,
    timeout_s: float = 10.0,
    session: Mapping[str, str] | None = None,
    prepared: bool = True,
) -> AsyncConnectionPool[Any]:
    """`session`: settings every connection of the pool makes once, for its whole life.
    `prepared=False`: psycopg never prepares a statement (a pooler in transaction mode)."""

    async def configure(conn: AsyncConnection[Any]) -> None:
        # explicit transactions everywhere; nothing runs in an implicit one
        await conn.set_autocommit(True)
        for name, value in (session or {}).items():
            await conn.execute("SELECT set_config(%s, %s, false)", (name, value))

    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        libpq_url(database_url),
        min_size=size,
        max_size=size,
        open=False,
        configure=configure,
        timeout=timeout_s,
        reconnect_timeout=3600.0,
        kwargs={
            "application_name": "billing-platform",
            **({} if prepared else {"prepare_threshold": None}),
        },
    )
    await pool.open(wait=True, timeout=timeout_s)
    return pool


async def ping(pool: AsyncConnectionPool[Any], timeout_s: float = 2.0) -> bool:
    """True when a pooled connection answers a trivial query in time."""
    try:
        async with pool.connection(timeout=timeout_s) as conn:
            await conn.execute("SELECT 1")
        return True
    except Exception:
        return False
