"""What the fault tests share: real processes on free ports, the scale of a run, the books
of a set of tenants, and the figures a test hands to `make reliability`'s table.

`RELIABILITY_SCALE` (default 1, as in `make test`) multiplies the load of every test;
`RELIABILITY_REPORT`, when set, is a JSON-lines file each test appends its figures to."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc
from psycopg_pool import AsyncConnectionPool

from tests import factories as f

ROOT = Path(__file__).resolve().parents[2]
Pool = AsyncConnectionPool[Any]


def scale() -> int:
    return max(1, int(os.environ.get("RELIABILITY_SCALE", "1") or 1))


def report(suite: str, **figures: int | float | str) -> None:
    """Hand one test's figures to the `make reliability` table (nothing happens otherwise)."""
    path = os.environ.get("RELIABILITY_REPORT", "").strip()
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps({"suite": suite, **figures}) + "\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Process:
    """A child process of the system (`python -m <module>`) with its output in a file."""

    module: str
    env: dict[str, str]
    log: Path
    args: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module, *self.args],
            env={**os.environ, "PYTHONPATH": str(ROOT), "LOG_FORMAT": "json", **self.env},
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        out.close()

    def kill(self) -> None:
        """SIGKILL: no drain, no clean-up of any kind."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Sidecar(Process):
    port: int = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def serving(self, timeout_s: float = 20.0) -> None:
        """Wait until health says SERVING."""
        deadline = time.monotonic() + timeout_s
        while True:
            if await health(self.target) == "SERVING":
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"the sidecar exited:\n{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the sidecar never served:\n{self.output()[-3000:]}")
            await asyncio.sleep(0.1)


def sidecar(database_url: str, log: Path, **env: str) -> Sidecar:
    port = free_port()
    return Sidecar(
        "quota_service",
        {
            "DATABASE_URL": database_url,
            "QUOTA_GRPC_PORT": str(port),
            "QUOTA_METRICS_PORT": "-1",
            "QUOTA_DRAIN_SECONDS": "1",
            **env,
        },
        log,
        port=port,
    )


async def health(target: str) -> str:
    """SERVING, NOT_SERVING or DOWN (nothing answers)."""
    async with grpc.aio.insecure_channel(target) as channel:
        try:
            answer = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=0.5
            )
        except grpc.aio.AioRpcError:
            return "DOWN"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status))


@contextlib.contextmanager
def running(*processes: Process) -> Iterator[None]:
    try:
        yield
    finally:
        for p in processes:
            p.stop()


async def wait_http(url: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=1) as http:
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(url)).status_code < 500:
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"{url} never answered")
            await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def pool_of(url: str, size: int = 2) -> AsyncIterator[Pool]:
    from billing_core.db.pool import open_pool

    pool = await open_pool(url, size)
    try:
        yield pool
    finally:
        await pool.close()


async def books(pool: Pool, tenants: list[str]) -> dict[str, int]:
    """Counters against records (daily and overall windows of the tenants' plans): windows
    whose `used` is not the sum of their records, windows over a blocking limit, records
    counted twice (one request id, two records), requests claimed as decided whose record
    does not exist, and wallets off their ledger."""
    [(off, over)] = await f.fetch(
        pool,
        """
        SELECT count(*) FILTER (WHERE c.used <> coalesce(r.total, 0)),
               count(*) FILTER (WHERE q.overage = 'block' AND c.used > q."limit")
        FROM usage_counters c
        JOIN subscriptions s ON s.tenant_id = c.tenant_id AND s.is_current
        LEFT JOIN plan_quotas q ON q.plan_id = s.plan_id AND q.resource = c.resource
                                AND q.period = c.period
        LEFT JOIN LATERAL (
            SELECT sum(amount) AS total FROM usage_records r
            WHERE r.tenant_id = c.tenant_id AND r.resource = c.resource
              AND r.occurred_at >= c.window_start
              AND (c.period <> 'daily' OR r.occurred_at < c.window_start + interval '1 day')
        ) r ON true
        WHERE c.tenant_id = ANY(%s) AND c.period IN ('daily', 'overall')
        """,
        tenants,
    )
    [(twice,)] = await f.fetch(
        pool,
        "SELECT count(*) FROM (SELECT request_id FROM usage_records WHERE tenant_id = ANY(%s)"
        " AND request_id IS NOT NULL GROUP BY tenant_id, request_id HAVING count(*) > 1) d",
        tenants,
    )
    [(claimed,)] = await f.fetch(
        pool,
        "SELECT count(*) FROM idempotency_keys k WHERE k.tenant_id = ANY(%s)"
        " AND (k.response->>'allowed')::boolean AND k.response->>'usage_record_id' <> ''"
        " AND NOT EXISTS (SELECT 1 FROM usage_records r WHERE r.tenant_id = k.tenant_id"
        "  AND r.usage_record_id = k.response->>'usage_record_id')",
        tenants,
    )
    [(wallets,)] = await f.fetch(
        pool,
        "SELECT count(*) FROM wallets w WHERE w.tenant_id = ANY(%s) AND w.balance_micros <>"
        " (SELECT coalesce(sum(delta_micros), 0) FROM wallet_ledger l"
        "  WHERE l.tenant_id = w.tenant_id)",
        tenants,
    )
    return {
        "windows_off_records": int(off),
        "windows_over_limit": int(over),
        "requests_counted_twice": int(twice),
        "claimed_but_uncounted": int(claimed),
        "wallets_off_ledger": int(wallets),
    }
