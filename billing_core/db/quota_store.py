"""PostgreSQL for the quota engine: the QuotaStore and QuotaSession of
billing_core/quota/ports.py, over libpq's pipeline (db/wire.py): BEGIN goes out with a
transaction's first reads, its writes with its COMMIT."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import orjson
import psycopg
import structlog
from psycopg import errors as pg_errors
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from billing_core.db.quota_sql import (
    CLAIM_RACE_SQLSTATE,
    COUNTERS,
    DELETE_EXPIRED_KEYS,
    LAPSED_RESERVATIONS,
    LAPSED_TENANTS,
    LOCK_RESERVATIONS,
    OFFERS,
    context_from_row,
    lapsed_reservations,
    lock_parameters,
    locks,
    offers_from_json,
    reads,
    text_array,
    timestamp,
    transaction_settings,
    write_parameters,
    writes,
)
from billing_core.db.wire import BEGIN, COMMIT, FORGOTTEN, Wire
from billing_core.errors import Unavailable
from billing_core.quota.model import Changes, PlanOffer, Reservation, StoredKey, TenantKey
from billing_core.quota.ports import BatchAborted, Locked, Pending, Reads, Work
from billing_core.rules.pricing import ModelPrice
from billing_core.rules.resources import Period
from billing_core.rules.wallet import LiveGrant

log = structlog.get_logger(__name__)
T = TypeVar("T")
# Lock order, the same in every transaction, so concurrent ones never deadlock:
# reservations → counter rows (by tenant, resource, period, window start) → wallet rows →
# grants.
_RETRYABLE = (pg_errors.SerializationFailure, pg_errors.DeadlockDetected)
_MAX_FORGOTTEN = 100  # more connections than any pool has
_MAX_ABORTED = 5
_MAX_LOST = 2  # connections found dead in a row before the call answers UNAVAILABLE
# while the database is known to be unreachable, how long a transaction waits for a
# connection before it answers UNAVAILABLE (the first one to find it so waited the full
# acquire timeout): callers hear at once, and each call still probes whether it is back
_ACQUIRE_WHILE_DOWN_S = 0.2
# a connection that died under the call (its backend was terminated or crashed, an idle
# timeout closed it, its socket broke): another one may well work
_LOST_SQLSTATES = frozenset(("57P01", "57P02", "57P05"))


def _already(value: T) -> Pending[T]:
    """The result of a statement that did not need sending."""

    async def result() -> T:
        return value

    return result


class PgQuotaSession:
    """QuotaSession over one connection's pipeline, for one transaction."""

    def __init__(self, wire: Wire) -> None:
        self._wire = wire

    def lock_reservations(
        self, wanted: Sequence[tuple[str, str]]
    ) -> Pending[dict[tuple[str, str], Reservation]]:
        slot = self._wire.send(
            LOCK_RESERVATIONS,
            {"tenants": text_array(w[0] for w in wanted), "ids": text_array(w[1] for w in wanted)},
        )

        async def result() -> dict[tuple[str, str], Reservation]:
            rows = orjson.loads(await self._wire.value(slot) or b"")
            return {(row[0], row[1]): _reservation(row[1:]) for row in rows}

        return result

    def read(
        self,
        tenant_ids: Sequence[str],
        resources: Sequence[str] | None,
        models: Sequence[tuple[str, str]],
        keys: Sequence[tuple[str, str]],
        now: datetime,
        *,
        lock_counters: Sequence[TenantKey] = (),
        lock_wallets: Sequence[str] = (),
    ) -> Pending[Reads]:
        locking = bool(lock_counters or lock_wallets)
        values = {
            "tenants": text_array(tenant_ids),
            "resources": None if resources is None else text_array(resources),
            "now": now.isoformat(),
            "providers": text_array(m[0] for m in models),
            "models": text_array(m[1] for m in models),
            "key_tenants": text_array(k[0] for k in keys),
            "key_ids": text_array(k[1] for k in keys),
        }
        if locking:
            values |= lock_parameters(lock_counters, lock_wallets, now)
        statement = reads(bool(models), bool(keys), bool(lock_counters), bool(lock_wallets))
        slot = self._wire.send(statement, values)

        async def result() -> Reads:
            answer = await self._wire.result(slot)
            contexts, prices, taken = (
                orjson.loads(answer.get_value(0, i) or b"") for i in range(3)
            )
            locked = _locked(answer.get_value(0, 3)) if locking else Locked({}, {}, {})
            return Reads(
                {c[0]: context_from_row(c) for c in contexts},
                {(p[0], p[1]): ModelPrice(p[0], p[1], timestamp(p[2]), p[3], p[4]) for p in prices},
                {(k[0], k[1]): StoredKey(k[2], k[3], k[4]) for k in taken if k[5]},
                locked,
            )

        return result

    def lapsed_reservations(
        self, tenant_ids: Sequence[str], now: datetime, *, lock: bool
    ) -> Pending[dict[str, list[Reservation]]]:
        slot = self._wire.send(
            LAPSED_RESERVATIONS if lock else lapsed_reservations(lock=False),
            {"tenants": text_array(tenant_ids), "now": now.isoformat()},
        )

        async def result() -> dict[str, list[Reservation]]:
            found: dict[str, list[Reservation]] = {}
            for row in orjson.loads(await self._wire.value(slot) or b""):
                found.setdefault(row[0], []).append(_reservation(row[1:]))
            return found

        return result

    def lock(
        self, counters: Sequence[TenantKey], wallets: Sequence[str], now: datetime
    ) -> Pending[Locked]:
        if not counters and not wallets:
            return _already(Locked({}, {}, {}))
        statement, values = locks(counters, wallets, now)
        slot = self._wire.send(statement, values)

        async def result() -> Locked:
            return _locked(await self._wire.value(slot))

        return result

    def counters(self, keys: Sequence[TenantKey]) -> Pending[dict[TenantKey, tuple[int, int]]]:
        found: dict[TenantKey, tuple[int, int]] = dict.fromkeys(keys, (0, 0))
        if not keys:
            return _already(found)
        slot = self._wire.send(
            COUNTERS,
            {
                "tenants": text_array(k[0] for k in keys),
                "resources": text_array(k[1] for k in keys),
                "periods": text_array(k[2].value for k in keys),
                "starts": text_array(k[3].isoformat() for k in keys),
            },
        )

        async def result() -> dict[TenantKey, tuple[int, int]]:
            for t, resource, period, start, used, reserved in orjson.loads(
                await self._wire.value(slot) or b""
            ):
                found[(t, resource, Period(period), timestamp(start))] = (used, reserved)
            return found

        return result

    def write(self, changes: Changes, now: datetime, keys_expire_at: datetime) -> Pending[int]:
        parts, values = write_parameters(changes, now, keys_expire_at)
        if not parts:  # denials and dry runs only: nothing to write
            return _already(0)
        slot = self._wire.send(writes(parts), values)

        async def result() -> int:
            return int(await self._wire.value(slot) or b"0")

        return result

    def offers(
        self, wanted: Sequence[tuple[str, str | None]]
    ) -> Pending[dict[tuple[str, str | None], list[PlanOffer]]]:
        slots = [(w, self._wire.send(OFFERS, {"resource": w[0], "exclude": w[1]})) for w in wanted]

        async def result() -> dict[tuple[str, str | None], list[PlanOffer]]:
            return {w: offers_from_json(w[0], await self._wire.value(s) or b"") for w, s in slots}

        return result


def _locked(text: bytes | None) -> Locked:
    """What a lock statement (or the lock part of a read) answers."""
    locked = Locked({}, {}, {})
    for kind, t, name, period, at, n1, n2, empty in orjson.loads(text or b""):
        if kind == "c":
            locked.counters[(t, name, Period(period), timestamp(at))] = (n1, n2, empty)
        elif kind == "w":
            locked.wallets[t] = (n1, n2)
        else:
            locked.grants.setdefault(t, []).append(LiveGrant(name, n1, timestamp(at)))
    return locked


def _reservation(row: list[Any]) -> Reservation:
    rid, request_id, resource, amount, windows, held, status, expires_at, response = row
    return Reservation(
        rid,
        request_id,
        resource,
        amount,
        tuple(
            (resource, Period(w["period"]), datetime.fromisoformat(w["window_start"]))
            for w in windows
        ),
        held,
        status,
        timestamp(expires_at),
        response,
    )


class PgQuotaStore:
    """QuotaStore over a shared pool and, for the coalescing lanes, a pool of their own:
    a lane that keeps to one backend finds its statements prepared and its caches warm.

    `session_lock_timeouts`: when the pools' connections serve the quota engine only and
    were opened with plan_settings() and these lock timeouts (shared pool, batch pool), a
    transaction that wants those sends no settings of its own."""

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
        self._pool = pool
        self._prepared = prepared
        self._transaction_settings = transaction_settings(generic=generic_plans)
        self._batch_pool = batch_pool or pool
        self._acquire_timeout_s = acquire_timeout_s
        self._session_lock_timeouts = session_lock_timeouts
        self.connections_lost = 0
        # set when no connection could be had within the acquire timeout; cleared by the
        # first transaction that gets one
        self.database_down = False

    def _acquire_s(self) -> float:
        if self.database_down:
            return min(self._acquire_timeout_s, _ACQUIRE_WHILE_DOWN_S)
        return self._acquire_timeout_s

    async def run(self, work: Work[T], *, lock_timeout_ms: int = 0, shared: bool = True) -> T:
        pool = self._pool if shared else self._batch_pool
        preset = self._session_lock_timeouts
        settings = (
            None
            if preset is not None and preset[0 if shared else 1] == lock_timeout_ms
            else {"lock_timeout": str(lock_timeout_ms)}
        )

        async def attempt() -> T:
            async with (
                pool.connection(timeout=self._acquire_s()) as conn,
                Wire.open(conn, prepared=self._prepared) as wire,
            ):
                wire.send(BEGIN)
                if settings is not None:
                    wire.send(self._transaction_settings, settings)
                answers = await work(PgQuotaSession(wire))
                wire.send(COMMIT)  # with the writes: one round trip
                await wire.sync()
                return await answers()

        return await self._retrying(attempt)

    async def _retrying(self, attempt: Callable[[], Awaitable[T]]) -> T:
        aborted = forgotten = lost = 0
        while True:
            try:
                result = await attempt()
                self.database_down = False
                return result
            except PoolTimeout:
                if not self.database_down:
                    log.warning("database_unreachable", acquire_timeout_s=self._acquire_timeout_s)
                self.database_down = True
                raise Unavailable("database unavailable: no connection") from None
            except FORGOTTEN:  # once per connection after psycopg deallocated (db/wire.py)
                forgotten += 1
                if forgotten > _MAX_FORGOTTEN:
                    raise Unavailable("the database kept forgetting prepared statements") from None
            except _RETRYABLE:
                aborted += 1
                if aborted == _MAX_ABORTED:
                    raise Unavailable("the database kept aborting the transaction") from None
                await asyncio.sleep(0.001 * 2 ** (aborted - 1))
            except pg_errors.LockNotAvailable:
                raise BatchAborted("locked") from None
            except (psycopg.OperationalError, TimeoutError) as exc:
                lost += 1
                if lost > _MAX_LOST or not _connection_lost(exc):
                    raise Unavailable(f"database unavailable: {type(exc).__name__}") from None
                # the pool replaces the connection; the attempt runs again on another one.
                # Safe even when the COMMIT had gone out: every request it decided has a
                # request_id (or reservation) that replays its answer instead of counting
                self.connections_lost += 1
                log.warning("connection_lost_retrying", error=str(exc)[:200])
            except psycopg.Error as exc:
                if exc.sqlstate == CLAIM_RACE_SQLSTATE:
                    raise BatchAborted("race") from None
                raise BatchAborted("refused", str(exc)) from None

    async def _json_rows(self, sql: str, params: dict[str, Any]) -> list[Any]:
        async def attempt() -> list[Any]:
            async with self._pool.connection(timeout=self._acquire_s()) as conn:
                cur = await conn.execute(sql, params)
                row = await cur.fetchone()
                return orjson.loads(row[0]) if row and row[0] else []

        return await self._retrying(attempt)

    async def lapsed_tenants(
        self, now: datetime, limit: int, tenant_ids: Sequence[str] | None = None
    ) -> list[str]:
        rows = await self._json_rows(
            LAPSED_TENANTS, {"now": now, "n": limit, "tenants": _list(tenant_ids)}
        )
        return [str(t) for t in rows]

    async def delete_expired_keys(self, now: datetime, limit: int) -> int:
        async def attempt() -> int:
            async with (
                self._pool.connection(timeout=self._acquire_s()) as conn,
                conn.transaction(),
            ):
                cur = await conn.execute(DELETE_EXPIRED_KEYS, {"now": now, "n": limit})
                row = await cur.fetchone()
                return int(row[0]) if row else 0

        return await self._retrying(attempt)


def _list(values: Iterable[str] | None) -> list[str] | None:
    return None if values is None else list(values)


def _connection_lost(exc: BaseException) -> bool:
    """A dead connection, as opposed to a database that cannot be reached (no connection
    within the acquire timeout: retrying would only wait as long again)."""
    if isinstance(exc, PoolTimeout) or not isinstance(exc, psycopg.Error):
        return False
    return exc.sqlstate is None or exc.sqlstate in _LOST_SQLSTATES
