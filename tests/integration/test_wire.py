"""db/wire.py against a real server: statements prepared once per connection, errors as
psycopg's own classes with nothing written, the connection handed back usable, big
parameters, and a cancelled read that cannot leave a half-read connection in the pool."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest
from psycopg import errors as pg_errors
from psycopg.pq import TransactionStatus
from psycopg_pool import AsyncConnectionPool

from billing_core.db.wire import _PREPARED, BEGIN, COMMIT, FORGOTTEN, Statement, Wire

_TABLE = "CREATE TABLE IF NOT EXISTS wire_probe (k text PRIMARY KEY, v bigint NOT NULL)"
INSERT = Statement("INSERT INTO wire_probe (k, v) VALUES (%(k)s::text, %(v)s::bigint)")
COUNT = Statement("SELECT count(*) FROM wire_probe WHERE k LIKE %(prefix)s::text || '%%'")
ECHO = Statement("SELECT length(%(blob)s::text), %(n)s::int + %(n)s::int")


async def _count(conn: psycopg.AsyncConnection[Any], prefix: str) -> int:
    cur = await conn.execute("SELECT count(*) FROM wire_probe WHERE k LIKE %s || '%%'", (prefix,))
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture(scope="module")
async def probe(pool: AsyncConnectionPool[Any]) -> None:
    async with pool.connection() as conn:
        await conn.execute(_TABLE)


def test_placeholders_become_numbered_parameters() -> None:
    s = Statement("SELECT %(a)s::int, %(b)s::text, %(a)s::int, 'x%%'")
    assert s.text == b"SELECT $1::int, $2::text, $1::int, 'x%'"
    assert s.params == ("a", "b")
    assert s.encode({"a": 7, "b": None}) == [b"7", None]
    assert s.name.startswith(b"wire_") and s.name != Statement("SELECT 1").name


async def test_one_round_trip_commits_and_prepares_once(
    pool: AsyncConnectionPool[Any], probe: None, uid: str
) -> None:
    async with pool.connection() as conn:
        for round_ in range(3):
            async with Wire.open(conn) as wire:
                wire.send(BEGIN)
                for i in range(2):
                    wire.send(INSERT, {"k": f"{uid}-{round_}-{i}", "v": i})
                counted = wire.send(COUNT, {"prefix": uid})
                assert await wire.value(counted) == str(2 * round_ + 2).encode()
                wire.send(COMMIT)
                await wire.sync()
            assert conn.info.transaction_status is TransactionStatus.IDLE
        cur = await conn.execute(
            "SELECT count(*) FROM pg_prepared_statements WHERE name = ANY(%s)",
            ([INSERT.name.decode(), COUNT.name.decode()],),
        )
        assert await cur.fetchone() == (2,)  # prepared once each, used three times
        assert await _count(conn, uid) == 6


async def test_an_error_is_psycopgs_and_writes_nothing(
    pool: AsyncConnectionPool[Any], probe: None, uid: str
) -> None:
    async with pool.connection() as conn:
        with pytest.raises(pg_errors.UniqueViolation):
            async with Wire.open(conn) as wire:
                wire.send(BEGIN)
                wire.send(INSERT, {"k": f"{uid}-a", "v": 1})
                twin = wire.send(INSERT, {"k": f"{uid}-a", "v": 2})
                after = wire.send(COUNT, {"prefix": uid})
                with pytest.raises(pg_errors.UniqueViolation):
                    await wire.result(after)  # skipped by the server: the cause is raised
                await wire.result(twin)
        assert conn.info.transaction_status is TransactionStatus.IDLE
        assert await _count(conn, uid) == 0  # rolled back, and the connection works


async def test_a_python_exception_rolls_back(
    pool: AsyncConnectionPool[Any], probe: None, uid: str
) -> None:
    async with pool.connection() as conn:
        with pytest.raises(RuntimeError):
            async with Wire.open(conn) as wire:
                wire.send(BEGIN)
                inserted = wire.send(INSERT, {"k": f"{uid}-a", "v": 1})
                await wire.result(inserted)
                raise RuntimeError("the batch's own bug")
        assert await _count(conn, uid) == 0


async def test_a_statement_that_fails_to_prepare_is_prepared_again(
    pool: AsyncConnectionPool[Any], probe: None, uid: str
) -> None:
    broken = Statement(f"SELECT v FROM wire_probe_{uid} WHERE k = %(k)s::text")
    async with pool.connection() as conn:
        for _ in range(2):  # the second time the name would be unknown if it were remembered
            with pytest.raises(pg_errors.UndefinedTable):
                async with Wire.open(conn) as wire:
                    await wire.result(wire.send(broken, {"k": "x"}))
            assert broken.name not in _PREPARED[conn.pgconn]
        await conn.execute(f"CREATE TABLE wire_probe_{uid} (k text, v int)")
        try:
            async with Wire.open(conn) as wire:
                assert await wire.result(wire.send(broken, {"k": "x"})) is not None
                await wire.sync()
        finally:
            await conn.execute(f"DROP TABLE wire_probe_{uid}")


async def test_parameters_bigger_than_the_socket_buffers(pool: AsyncConnectionPool[Any]) -> None:
    blob = "x" * 8_000_000
    async with pool.connection() as conn, Wire.open(conn) as wire:
        first = wire.send(ECHO, {"blob": blob, "n": 20})
        second = wire.send(ECHO, {"blob": blob[:10], "n": 1})
        answer = await wire.result(first)
        assert (answer.get_value(0, 0), answer.get_value(0, 1)) == (b"8000000", b"40")
        assert await wire.value(second) == b"10"
        await wire.sync()


async def test_a_cancelled_read_closes_the_connection(pool: AsyncConnectionPool[Any]) -> None:
    async with pool.connection() as conn:

        async def slow() -> None:
            async with Wire.open(conn) as wire:
                await wire.result(wire.send(b"SELECT pg_sleep(5)"))

        task = asyncio.create_task(slow())
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert conn.closed  # the pool replaces it; the server rolls back
    async with pool.connection() as other:
        assert await (await other.execute("SELECT 1")).fetchone() == (1,)


async def test_statements_deallocated_behind_its_back_are_prepared_again(
    pool: AsyncConnectionPool[Any], probe: None, uid: str
) -> None:
    async with pool.connection() as conn:
        async with Wire.open(conn) as wire:
            assert await wire.value(wire.send(COUNT, {"prefix": uid})) == b"0"
            await wire.sync()
        await conn.execute("DEALLOCATE ALL")  # as psycopg does after a ROLLBACK
        with pytest.raises(FORGOTTEN):
            async with Wire.open(conn) as wire:
                await wire.result(wire.send(COUNT, {"prefix": uid}))
        async with Wire.open(conn) as wire:  # the caller's retry
            assert await wire.value(wire.send(COUNT, {"prefix": uid})) == b"0"
            await wire.sync()


async def test_a_connection_lost_between_batches_fails_and_is_replaced(
    pool: AsyncConnectionPool[Any], probe: None, uid: str
) -> None:
    async with pool.connection() as conn:
        async with Wire.open(conn) as wire:
            await wire.result(wire.send(COUNT, {"prefix": uid}))
            await wire.sync()
        async with pool.connection() as admin:
            await admin.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
        with pytest.raises(psycopg.OperationalError):
            async with Wire.open(conn) as wire:
                wire.send(BEGIN)
                await wire.result(wire.send(COUNT, {"prefix": uid}))
        assert conn.closed
    async with pool.connection() as other:  # the pool has replaced it
        assert await (await other.execute("SELECT 1")).fetchone() == (1,)
