"""The two references the sidecar is measured against, each a real grpc.aio server in its own
process: `echo` (same service and message sizes, a canned answer, no database) and
`textbook` (one transaction per call: SELECT … FOR UPDATE, UPDATE, INSERT — the
straightforward implementation, kept here for comparison only).

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
from billing_core.periods import tenant_zone, window_for
from billing_core.resources import Period

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


async def serve(kind: str, port: int, database_url: str) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pool = None
    if kind == "echo":
        pb_grpc.add_QuotaServiceServicer_to_server(Echo(), server)
    else:
        pool = await open_pool(database_url, 8)
        pb_grpc.add_QuotaServiceServicer_to_server(Textbook(pool), server)
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
    parser.add_argument("kind", choices=["echo", "textbook"])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--database-url", default="")
    args = parser.parse_args()
    asyncio.run(serve(args.kind, args.port, args.database_url))


if __name__ == "__main__":
    main()
