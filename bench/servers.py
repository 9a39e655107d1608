"""The references the sidecar is measured against, each a real grpc.aio server in its own
process: `echo` (same service and message sizes, a canned answer, no database),
`textbook` (one transaction per call: SELECT … FOR UPDATE, UPDATE, INSERT — the
straightforward implementation, kept here for comparison only) and two floors, the least
a durable call can cost the same stack at one call in flight: `floor1` writes one usage
record and waits for its commit (one round trip: what any durable answer needs), `floor2`
locks a counter, decides in Python, then updates it and writes the record (two round
trips through the sidecar's own Wire: what any design that decides in the application on
locked rows needs).

    python -m bench.servers echo --port 0
    python -m bench.servers textbook --port 0 --database-url postgresql://…
Each prints its port on the first line of stdout."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import secrets
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from psycopg_pool import AsyncConnectionPool
from quota.v1 import quota_service_pb2 as pb
from quota.v1 import quota_service_pb2_grpc as pb_grpc

from billing_core.db.pool import open_pool
from billing_core.db.wire import BEGIN, COMMIT, Statement, Wire
from billing_core.rules.periods import tenant_zone, window_for
from billing_core.rules.resources import Period

_TOMORROW = Timestamp(seconds=1_900_000_000)
_UTC = tenant_zone("UTC")


def canned(used: int) -> pb.CheckAndConsumeResponse:
    """An allowed answer with two windows, like the sidecar's for the hot scenario."""
    return pb.CheckAndConsumeResponse(
        allowed=True,
        reason=pb.REASON_ALLOWED,
        windows=[
            pb.WindowStatus(period=pb.PERIOD_DAILY, limit=1_000_000, used=used,
                            remaining=1_000_000 - used, resets_at=_TOMORROW,
                            state=pb.WINDOW_STATE_OK),
            pb.WindowStatus(period=pb.PERIOD_MONTHLY, limit=50_000_000, used=used,
                            remaining=50_000_000 - used, resets_at=_TOMORROW,
                            state=pb.WINDOW_STATE_OK),
        ],
        cost_micros=10,
        wallet_balance_micros=1_000_000,
        usage_record_id="ur_" + secrets.token_hex(14),
    )  # fmt: skip


class _OnlyCheckAndConsume(pb_grpc.QuotaServiceServicer):
    """The references implement the one RPC the benchmark calls."""

    async def _unimplemented(self, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "benchmark reference")

    async def Reserve(self, request: Any, context: Any) -> Any:
        return await self._unimplemented(context)

    async def Commit(self, request: Any, context: Any) -> Any:
        return await self._unimplemented(context)

    async def Release(self, request: Any, context: Any) -> Any:
        return await self._unimplemented(context)

    async def Free(self, request: Any, context: Any) -> Any:
        return await self._unimplemented(context)

    async def GetUsage(self, request: Any, context: Any) -> Any:
        return await self._unimplemented(context)

    async def ReportUsage(self, request: Any, context: Any) -> Any:
        return await self._unimplemented(context)


class Echo(_OnlyCheckAndConsume):
    def __init__(self) -> None:
        self.calls = 0

    async def CheckAndConsume(
        self, request: pb.CheckAndConsumeRequest, context: Any
    ) -> pb.CheckAndConsumeResponse:
        self.calls += 1
        return canned(self.calls)


class Textbook(_OnlyCheckAndConsume):
    """One transaction per call, rows locked with SELECT … FOR UPDATE; no batching."""

    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        self.pool = pool

    async def CheckAndConsume(
        self, request: pb.CheckAndConsumeRequest, context: Any
    ) -> pb.CheckAndConsumeResponse:
        now = datetime.now(UTC)
        windows = [
            window_for(Period.DAILY, now, _UTC, now),
            window_for(Period.MONTHLY, now, _UTC, datetime(2026, 1, 1, tzinfo=UTC)),
        ]
        limits = {"daily": 1_000_000_000, "monthly": 50_000_000_000}
        # its own rows: the textbook never touches the sidecar's tenants
        t, res, amount = "textbook-" + request.tenant_id, request.resource, request.amount
        async with self.pool.connection() as conn, conn.transaction():
            cur = await conn.execute(
                "INSERT INTO idempotency_keys (tenant_id, request_id, operation, request_hash,"
                " response, created_at, expires_at) VALUES (%s, %s, 'consume', %s, '{}', %s, %s)"
                " ON CONFLICT DO NOTHING RETURNING 1",
                (t, request.request_id, hashlib.sha256(request.SerializeToString()).hexdigest(),
                 now, now),
            )  # fmt: skip
            if await cur.fetchone() is None:
                return canned(0)
            used = []
            for w in windows:
                await conn.execute(
                    "INSERT INTO usage_counters (tenant_id, resource, period, window_start)"
                    " VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
                    (t, res, w.period.value, w.start),
                )
                cur = await conn.execute(
                    "SELECT used FROM usage_counters WHERE tenant_id = %s AND resource = %s"
                    " AND period = %s AND window_start = %s FOR UPDATE",
                    (t, res, w.period.value, w.start),
                )
                row = await cur.fetchone()
                assert row is not None
                if row[0] + amount > limits[w.period.value]:
                    raise RuntimeError("the textbook scenario never runs out")
                used.append(row[0] + amount)
            for w in windows:
                await conn.execute(
                    "UPDATE usage_counters SET used = used + %s WHERE tenant_id = %s"
                    " AND resource = %s AND period = %s AND window_start = %s",
                    (amount, t, res, w.period.value, w.start),
                )
            await conn.execute(
                "INSERT INTO usage_records (tenant_id, usage_record_id, resource, amount, kind,"
                " request_id, occurred_at) VALUES (%s, %s, %s, %s, 'consume', %s, %s)",
                (t, "ur_" + secrets.token_hex(14), res, amount, request.request_id, now),
            )
        return canned(used[0])


_RECORD = (
    "INSERT INTO usage_records (tenant_id, usage_record_id, resource, amount, kind, request_id,"
    " occurred_at) VALUES (%(tenant)s, %(id)s, %(resource)s, %(amount)s::bigint, 'consume',"
    " %(request)s, %(now)s::timestamptz)"
)
_LOCK_COUNTER = Statement("""
    INSERT INTO usage_counters AS c (tenant_id, resource, period, window_start)
    VALUES (%(tenant)s, %(resource)s, 'daily', %(start)s::timestamptz)
    ON CONFLICT (tenant_id, resource, period, window_start) DO UPDATE SET used = c.used
    RETURNING used""")
_WRITE = Statement(f"""
    WITH counter AS (
        UPDATE usage_counters SET used = used + %(amount)s::bigint
        WHERE tenant_id = %(tenant)s AND resource = %(resource)s AND period = 'daily'
          AND window_start = %(start)s::timestamptz
    )
    {_RECORD}""")


class Floor(_OnlyCheckAndConsume):
    """The least a durable call costs: one record (`round_trips=1`), or a counter locked,
    checked in Python, then updated with the record (`round_trips=2`). Its own rows."""

    def __init__(self, pool: AsyncConnectionPool[Any], round_trips: int) -> None:
        self.pool = pool
        self.round_trips = round_trips

    async def CheckAndConsume(
        self, request: pb.CheckAndConsumeRequest, context: Any
    ) -> pb.CheckAndConsumeResponse:
        now = datetime.now(UTC)
        values = {
            "tenant": f"floor{self.round_trips}-{request.tenant_id}",
            "id": "ur_" + secrets.token_hex(14),
            "resource": request.resource,
            "amount": request.amount,
            "request": request.request_id,
            "now": now.isoformat(),
            "start": window_for(Period.DAILY, now, _UTC, now).start.isoformat(),
        }
        async with self.pool.connection() as conn:
            if self.round_trips == 1:  # autocommit: the INSERT and its commit, one round trip
                await conn.execute(_RECORD, values, prepare=True)
                return canned(request.amount)
            async with Wire.open(conn) as wire:
                wire.send(BEGIN)
                used = int(await wire.value(wire.send(_LOCK_COUNTER, values)) or b"0")
                if used + request.amount > 10**15:
                    raise RuntimeError("the floor scenario never runs out")
                wire.send(_WRITE, values)
                wire.send(COMMIT)
                await wire.sync()
        return canned(used + request.amount)


async def serve(kind: str, port: int, database_url: str) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pool = None
    if kind == "echo":
        pb_grpc.add_QuotaServiceServicer_to_server(Echo(), server)
    else:
        pool = await open_pool(database_url, 8)
        servicer = Textbook(pool) if kind == "textbook" else Floor(pool, int(kind[-1]))
        pb_grpc.add_QuotaServiceServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(bound, flush=True)
    try:
        await server.wait_for_termination()
    finally:
        if pool is not None:
            await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["echo", "textbook", "floor1", "floor2"])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--database-url", default="")
    args = parser.parse_args()
    asyncio.run(serve(args.kind, args.port, args.database_url))


if __name__ == "__main__":
    main()
