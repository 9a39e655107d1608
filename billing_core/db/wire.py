"""A transaction's statements straight through libpq's pipeline: prepared once per
connection, parameters as text, and one round trip for everything queued (see Wire)."""

from __future__ import annotations

import asyncio
import hashlib
import re
import weakref
from collections import deque
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg import pq

Conn = psycopg.AsyncConnection[Any]
_OK = frozenset((pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK))
_IDLE = pq.TransactionStatus.IDLE
_ROLLBACK_FROM = frozenset((pq.TransactionStatus.INTRANS, pq.TransactionStatus.INERROR))
_PLACEHOLDER = re.compile(r"%\((\w+)\)s|%%")
# the statements each live connection has prepared (forgotten with the connection)
_PREPARED: weakref.WeakKeyDictionary[Any, set[bytes]] = weakref.WeakKeyDictionary()

BEGIN = b"BEGIN"
COMMIT = b"COMMIT"
# psycopg deallocates every prepared statement of a connection after it runs a ROLLBACK
# (also to a savepoint), DROP, ALTER or DISCARD ALL there, ours included: the next use of
# one fails with this error, the Wire forgets what the connection had prepared, and the
# caller retries (a batch whose transaction this error ended lost nothing).
FORGOTTEN = pg_errors.InvalidSqlStatementName


@dataclass(frozen=True)
class Statement:
    """SQL with psycopg's named placeholders (`%(name)s`), prepared under a name derived
    from its text; parameters are sent as text and typed by the SQL (cast them)."""

    sql: str
    name: bytes = field(init=False)
    text: bytes = field(init=False)
    params: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        order: dict[str, int] = {}

        def number(match: re.Match[str]) -> str:
            if match.group(1) is None:
                return "%"
            return f"${order.setdefault(match.group(1), len(order) + 1)}"

        text = _PLACEHOLDER.sub(number, self.sql)
        digest = hashlib.sha256(text.encode()).hexdigest()[:24]
        object.__setattr__(self, "text", text.encode())
        object.__setattr__(self, "name", f"wire_{digest}".encode())
        object.__setattr__(self, "params", tuple(order))

    def encode(self, values: Mapping[str, str | int | None]) -> list[bytes | None]:
        return [None if (v := values[p]) is None else str(v).encode() for p in self.params]


_SYNC = -1  # in the queue of awaited answers: the Sync's


class Wire:
    """One connection in libpq pipeline mode, for the duration of a transaction. psycopg's
    cursors would cost a statement each its own adaptation, turn of the event loop and
    Sync; a transaction that knows its statements can send them all at once:

        async with Wire.open(conn) as wire:  # pipeline mode; rolls back on an exception
            wire.send(BEGIN)
            slot = wire.send(READS, {"tenants": "{a,b}"})
            row = await wire.value(slot)      # one round trip for all that is queued
            wire.send(COMMIT)
            await wire.sync()                 # the COMMIT is durable

    A failed statement raises psycopg's own error class (SerializationFailure, a
    RaiseException with its SQLSTATE …); the statements queued behind it were skipped by
    the server and raise the same error."""

    def __init__(self, conn: Conn, *, prepared: bool = True) -> None:
        self._pg = conn.pgconn
        # False: every statement goes as an unnamed one (parse, bind, execute each time), as
        # a pooler in transaction mode needs (PgBouncer 1.18 cannot carry named ones)
        self._named = prepared
        self._encoding = conn.info.encoding
        self._prepared = _PREPARED.setdefault(self._pg, set())
        self._awaited: deque[tuple[int, bytes | None]] = deque()  # slot, statement prepared
        self._answers: dict[int, pq.abc.PGresult | psycopg.Error] = {}
        self._slots = 0
        self._flushed = 0  # the last slot a flush request or Sync has asked the server for
        self._failed: psycopg.Error | None = None  # the error that aborted the pipeline
        self._open = False
        self._reading = False  # a read interrupted (cancelled) leaves libpq mid-answer

    @classmethod
    @asynccontextmanager
    async def open(cls, conn: Conn, *, prepared: bool = True) -> AsyncIterator[Wire]:
        wire = cls(conn, prepared=prepared)
        wire._pg.enter_pipeline_mode()
        wire._open = True
        try:
            yield wire
        except BaseException:
            await wire._abandon()
            raise
        wire.close()

    def close(self) -> None:
        """Leave pipeline mode (every answer must have been read): psycopg may use the
        connection again, inside the transaction if one is open."""
        if self._open:
            self._open = False
            self._pg.exit_pipeline_mode()

    # --- sending -----------------------------------------------------------------

    def send(self, statement: Statement | bytes, values: Mapping[str, Any] | None = None) -> int:
        """Queue a statement (a bare command when given as bytes); returns its slot."""
        pg = self._pg
        if isinstance(statement, bytes):
            pg.send_query_params(statement, None)
        elif not self._named:
            pg.send_query_params(statement.text, statement.encode(values or {}))
        else:
            if statement.name not in self._prepared:
                pg.send_prepare(statement.name, statement.text)
                self._prepared.add(statement.name)
                self._awaited.append((self._new_slot(), statement.name))
            pg.send_query_prepared(statement.name, statement.encode(values or {}))
        slot = self._new_slot()
        self._awaited.append((slot, None))
        return slot

    def _new_slot(self) -> int:
        self._slots += 1
        return self._slots

    # --- answers -----------------------------------------------------------------

    async def result(self, slot: int) -> pq.abc.PGresult:
        """The statement's result (a round trip for everything queued, when not yet read);
        raises its error, or the error that made the server skip it."""
        if slot not in self._answers:
            if slot > self._flushed:  # else a flush request already covers it
                self._pg.send_flush_request()
                self._flushed = self._slots
            await self._read(until=slot)
        answer = self._answers.pop(slot)
        if isinstance(answer, psycopg.Error):
            raise answer
        return answer

    async def value(self, slot: int) -> bytes | None:
        """The first column of the first row (every batch statement answers one value)."""
        return (await self.result(slot)).get_value(0, 0)

    async def sync(self) -> None:
        """Send a Sync and read every answer (ending the pipeline's implicit transaction,
        if no BEGIN is open); raises the first error among the answers not yet taken."""
        self._pg.pipeline_sync()
        self._flushed = self._slots
        self._awaited.append((_SYNC, None))
        await self._read(until=_SYNC)
        self._failed = None  # the server takes statements again after a Sync
        for answer in self._answers.values():
            if isinstance(answer, psycopg.Error):
                self._answers.clear()
                raise answer

    async def _read(self, until: int) -> None:
        self._reading = True
        await self._read_answers(until)
        self._reading = False

    async def _read_answers(self, until: int) -> None:
        pg = self._pg
        await self._flush()
        results: list[pq.abc.PGresult] = []
        while self._awaited:
            if pg.is_busy():
                await self._ready(write=False)
                pg.consume_input()
                continue
            result = pg.get_result()
            slot, prepared = self._awaited[0]
            if slot == _SYNC:
                if result is None:  # the Sync's answer has not come yet
                    await self._ready(write=False)
                    pg.consume_input()
                    continue
                self._awaited.popleft()
                if until == _SYNC:
                    return
                continue
            if result is not None:
                results.append(result)
                continue
            self._awaited.popleft()
            last = results[-1]
            results = []
            answer: pq.abc.PGresult | psycopg.Error = last
            if last.status not in _OK:
                if last.status == pq.ExecStatus.FATAL_ERROR:
                    self._failed = pg_errors.error_from_result(last, encoding=self._encoding)
                    if isinstance(self._failed, FORGOTTEN):
                        self._prepared.clear()  # DEALLOCATE ALL (psycopg does, see FORGOTTEN)
                answer = self._failed or pg_errors.PipelineAborted("skipped after an error")
                if prepared is not None:
                    self._prepared.discard(prepared)  # the server did not prepare it
            if prepared is None:
                self._answers[slot] = answer
            if slot == until:
                return

    async def _flush(self) -> None:
        pg = self._pg
        while pg.flush() == 1:  # more to send than the socket took: wait, reading meanwhile
            await self._ready(write=True)
            pg.consume_input()

    async def _ready(self, *, write: bool) -> None:
        loop = asyncio.get_running_loop()
        fd = self._pg.socket
        ready: asyncio.Future[None] = loop.create_future()
        loop.add_reader(fd, _wake, ready)
        if write:
            loop.add_writer(fd, _wake, ready)
        try:
            await ready
        finally:
            loop.remove_reader(fd)
            if write:
                loop.remove_writer(fd)

    async def _abandon(self) -> None:
        """After an exception: read what is in flight, roll back, leave pipeline mode — or,
        when the connection cannot be brought back (cancelled mid-read, server gone), close
        it, so that the pool replaces it and the server rolls back. The caller's exception
        is the one that counts: a failure here only closes the connection."""
        try:
            if not self._reading and self._pg.status == pq.ConnStatus.OK:
                with suppress(psycopg.Error):
                    await self.sync()  # what is in flight, errors included
                if not self._reading and self._pg.transaction_status in _ROLLBACK_FROM:
                    self.send(b"ROLLBACK")
                    await self.sync()
                if not self._reading and self._pg.transaction_status == _IDLE:
                    self.close()
                    return
        except psycopg.Error:
            pass
        except BaseException:
            self._pg.finish()
            raise
        self._pg.finish()


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
