"""A transaction whose BEGIN and COMMIT ride in the pipeline with the statements around them.

psycopg's `conn.transaction()` syncs the pipeline on entry and on exit — two extra round
trips per transaction, which is most of the latency of a lone CheckAndConsume. Here BEGIN
goes out with the first reads and COMMIT with the last writes:

    async with pool.connection() as conn, conn.pipeline() as pipe:
        async with pipelined_transaction(conn, pipe) as tx:
            ...queue reads, fetch them (one round trip)...
            ...queue writes...
            await tx.commit()          # COMMIT goes with the writes: one more round trip

Leaving the block without `commit()` commits; an exception rolls back. Before nesting a
`conn.transaction()` (a savepoint) call `sync()`: libpq only knows it is inside a
transaction once a sync has come back.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import psycopg
from psycopg import AsyncPipeline
from psycopg.pq import TransactionStatus

Conn = psycopg.AsyncConnection[Any]


class PipelinedTransaction:
    def __init__(self, conn: Conn, pipe: AsyncPipeline) -> None:
        self._conn = conn
        self._pipe = pipe
        self.committed = False

    async def sync(self) -> None:
        """Send what is queued and wait for every result (errors are raised here)."""
        await self._pipe.sync()

    async def commit(self) -> None:
        """Queue COMMIT behind what is queued and wait until it is durable."""
        await self._conn.execute("COMMIT")
        await self._pipe.sync()
        self.committed = True


@asynccontextmanager
async def pipelined_transaction(
    conn: Conn, pipe: AsyncPipeline, *, begun: bool = False
) -> AsyncIterator[PipelinedTransaction]:
    """`begun`: the transaction is already open (BEGIN was sent and synced before)."""
    tx = PipelinedTransaction(conn, pipe)
    if not begun:
        await conn.execute("BEGIN")
    try:
        yield tx
        if not tx.committed:
            await tx.commit()
    except BaseException:
        if not tx.committed:
            await _rollback(conn, pipe)
        raise


async def _rollback(conn: Conn, pipe: AsyncPipeline) -> None:
    # results still in flight (and their errors) are drained first, so that the
    # transaction status is the server's; a broken connection is the pool's to discard
    with suppress(psycopg.Error):
        await pipe.sync()
    if conn.closed or conn.info.transaction_status is TransactionStatus.IDLE:
        return
    with suppress(psycopg.Error):
        await conn.execute("ROLLBACK")
        await pipe.sync()
