"""PostgreSQL taken away under load — first every sidecar backend terminated, then the
server stopped and started again: calls end with UNAVAILABLE within their deadline (none
hangs), health says NOT_SERVING during the outage, service comes back by itself within 5 s
of the database, and nothing acknowledged is lost.

The test runs its own embedded PostgreSQL (whatever DATABASE_URL says), the one server a
test may stop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import psycopg
from quota.v1 import quota_service_pb2 as pb
from quota.v1 import quota_service_pb2_grpc as pb_grpc

from billing_core.billing.model import quota
from billing_core.db.embedded import ensure_database
from billing_core.db.migrate import upgrade
from tests import factories as f
from tests.reliability.harness import ROOT, books, health, pool_of, report, scale, sidecar

DEADLINE_S = 2.0
WORKERS = 16
RECOVERY_BOUND_S = 5.0


@dataclass(frozen=True)
class Call:
    started: float
    ended: float
    code: grpc.StatusCode
    tenant: str
    request_id: str
    allowed: bool = False
    record: str = ""


def pgctl(action: str, data: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "tests.reliability.pgctl", action, str(data)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.strip()


@contextlib.contextmanager
def own_postgres() -> Iterator[tuple[Path, str]]:
    base = Path("/tmp") / f"bp-out-{os.getpid()}"  # short: the socket path
    data = base / "data"
    url = pgctl("start", data).splitlines()[-1]
    try:
        yield data, url
    finally:
        with contextlib.suppress(AssertionError):
            pgctl("stop", data)
        shutil.rmtree(base, ignore_errors=True)


async def test_database_restarted_and_backends_terminated_under_load(tmp_path: Path) -> None:
    outages = scale()
    with own_postgres() as (data, server_url):
        url = ensure_database(server_url, "outage")
        upgrade(url)
        async with pool_of(url) as pool:
            now = datetime.now(UTC)
            plan = await f.plan(pool, now, "outage", [quota("messages", "daily", 10**9)])
            tenants = [await f.tenant(pool, now, f"out{n}", plan) for n in range(8)]
        side = sidecar(url, tmp_path / "sidecar.log", QUOTA_DB_ACQUIRE_TIMEOUT_MS="1000")
        calls: list[Call] = []
        stop = asyncio.Event()
        side.start()
        try:
            await side.serving()
            async with grpc.aio.insecure_channel(side.target) as channel:
                stub: Any = pb_grpc.QuotaServiceStub(channel)

                async def worker(w: int) -> None:
                    n = 0
                    while not stop.is_set():
                        tenant, rid = tenants[n % len(tenants)], f"w{w}-{n}"
                        n += 1
                        started = time.monotonic()
                        try:
                            a = await stub.CheckAndConsume(
                                pb.CheckAndConsumeRequest(
                                    tenant_id=tenant, resource="messages", amount=1, request_id=rid
                                ),
                                timeout=DEADLINE_S,
                            )
                        except grpc.aio.AioRpcError as exc:
                            calls.append(Call(started, time.monotonic(), exc.code(), tenant, rid))
                            await asyncio.sleep(0.05)  # a caller backs off a little
                            continue
                        calls.append(
                            Call(
                                started, time.monotonic(), grpc.StatusCode.OK, tenant, rid,
                                a.allowed, a.usage_record_id,
                            )
                        )  # fmt: skip

                workers = [asyncio.create_task(worker(w)) for w in range(WORKERS)]
                windows: list[tuple[float, float]] = []
                recoveries: list[float] = []
                not_serving_seen = 0
                for _ in range(outages):
                    await asyncio.sleep(1.5)
                    # every backend of the sidecar terminated at once
                    with psycopg.connect(url, application_name="fault-injector") as conn:
                        conn.execute(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                            " WHERE application_name = 'billing-platform'"
                        )
                    await asyncio.sleep(1.5)
                    # the server stopped for a while, then started again
                    down = time.monotonic()
                    pgctl("stop", data)
                    seen = False
                    while time.monotonic() - down < 4.0:
                        seen = seen or await health(side.target) == "NOT_SERVING"
                        await asyncio.sleep(0.2)
                    not_serving_seen += seen
                    pgctl("start", data)
                    up = time.monotonic()
                    windows.append((down, up))
                    while not any(c.code == grpc.StatusCode.OK and c.started >= up for c in calls):
                        assert time.monotonic() - up < 30, "service never came back"
                        await asyncio.sleep(0.05)
                    recoveries.append(
                        min(
                            c.ended
                            for c in calls
                            if c.code == grpc.StatusCode.OK and c.started >= up
                        )
                        - up
                    )
                await asyncio.sleep(1.0)
                stop.set()
                await asyncio.gather(*workers)
                assert await health(side.target) == "SERVING"
        finally:
            side.kill()

        failed = [c for c in calls if c.code != grpc.StatusCode.OK]
        codes = {c.code for c in failed}
        during = [c for c in calls if any(a <= c.started <= b for a, b in windows)]
        longest = max(c.ended - c.started for c in during)
        assert failed and during, "the outage touched no call"
        t0 = calls[0].started
        assert codes <= {grpc.StatusCode.UNAVAILABLE}, [
            (round(c.started - t0, 2), round(c.ended - c.started, 2), c.code.name)
            for c in failed
            if c.code != grpc.StatusCode.UNAVAILABLE
        ][:40] + [(round(a - t0, 2), round(b - t0, 2)) for a, b in windows]
        assert longest <= DEADLINE_S, longest
        assert not_serving_seen == outages
        assert max(recoveries) <= RECOVERY_BOUND_S, recoveries

        async with pool_of(url) as pool:
            records = dict(
                await f.fetch(
                    pool,
                    "SELECT request_id, usage_record_id FROM usage_records"
                    " WHERE tenant_id = ANY(%s)",
                    tenants,
                )
            )
            lost = [c for c in calls if c.allowed and records.get(c.request_id) != c.record]
            result = await books(pool, tenants)
        assert lost == []
        assert result == {k: 0 for k in result}, result
        report(
            "PostgreSQL restarted and backends terminated under load",
            load=len(calls),
            load_unit="calls",
            faults=2 * outages,
            lost=len(lost),
            counted_twice=result["requests_counted_twice"],
            applied_twice=result["claimed_but_uncounted"],
            longest_outage_answer_ms=round(longest * 1000),
            notes=f"{len(failed)} calls answered UNAVAILABLE; back {max(recoveries):.2f} s"
            " after the database at the latest",
        )
