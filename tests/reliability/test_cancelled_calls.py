"""Slow and stuck: thousands of calls cancelled by their clients at random moments, or cut
by deadlines of a few milliseconds, leave no connection checked out, no transaction open and
no request half-counted; a caller's deadline is always honoured; a reservation whose holder
died comes back after its TTL."""

from __future__ import annotations

import asyncio
import random
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import httpx
from quota.v1 import quota_service_pb2 as pb
from quota.v1 import quota_service_pb2_grpc as pb_grpc

from billing_core.billing.model import quota
from tests import factories as f
from tests.conftest import fresh_database
from tests.reliability.harness import ROOT, books, free_port, pool_of, report, scale, sidecar

IN_FLIGHT = 64
CUT = {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}


def _gauges(text: str, name: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line.rsplit(" ", 1)
            out[labels[len(name) :]] = float(value)
    return out


async def test_cancelled_and_cut_calls_leave_nothing_behind(
    server_url: str, tmp_path: Path
) -> None:
    total = 500 * scale()
    with fresh_database(server_url, "bp_cancel") as url:
        async with pool_of(url) as pool:
            now = datetime.now(UTC)
            plan = await f.plan(pool, now, "cancel", [quota("messages", "daily", 10**9)])
            tenants = [await f.tenant(pool, now, f"cx{n}", plan) for n in range(8)]
            metrics_port = free_port()
            side = sidecar(url, tmp_path / "sidecar.log", QUOTA_METRICS_PORT=str(metrics_port))
            side.start()
            overshoot = 0.0
            outcomes: dict[str, int] = {}
            try:
                await side.serving()
                async with grpc.aio.insecure_channel(side.target) as channel:
                    stub: Any = pb_grpc.QuotaServiceStub(channel)
                    gate = asyncio.Semaphore(IN_FLIGHT)
                    rng = random.Random(7)

                    async def one(n: int) -> None:
                        nonlocal overshoot
                        req = pb.CheckAndConsumeRequest(
                            tenant_id=tenants[n % len(tenants)],
                            resource="messages",
                            amount=1,
                            request_id=f"x{n}",
                        )
                        async with gate:
                            if n % 2:  # the client gives up at a random moment
                                call = stub.CheckAndConsume(req, timeout=10)
                                await asyncio.sleep(rng.random() * 0.03)
                                call.cancel()
                                try:
                                    await call
                                    kind = "answered"
                                except asyncio.CancelledError:
                                    kind = "cancelled"
                                except grpc.aio.AioRpcError as exc:
                                    assert exc.code() == grpc.StatusCode.CANCELLED, exc
                                    kind = "cancelled"
                            else:  # a deadline of a few milliseconds
                                deadline = 0.001 + rng.random() * 0.04
                                started = time.monotonic()
                                try:
                                    await stub.CheckAndConsume(req, timeout=deadline)
                                    kind = "answered"
                                except grpc.aio.AioRpcError as exc:
                                    # past its deadline, the call ends as the client's
                                    # own cancellation when that came first
                                    assert exc.code() in CUT, exc
                                    kind = "deadline"
                                overshoot = max(overshoot, time.monotonic() - started - deadline)
                        outcomes[kind] = outcomes.get(kind, 0) + 1

                    await asyncio.gather(*(one(n) for n in range(total)))
                    # the sidecar still answers, and everything it held is given back
                    answer = await stub.CheckAndConsume(
                        pb.CheckAndConsumeRequest(
                            tenant_id=tenants[0], resource="messages", amount=1, request_id="after"
                        ),
                        timeout=5,
                    )
                    assert answer.allowed
                deadline_at = time.monotonic() + 10
                async with httpx.AsyncClient() as http:
                    while True:
                        text = (await http.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
                        in_use = {
                            k: v
                            for k, v in _gauges(text, "quota_db_pool_connections").items()
                            if 'state="in_use"' in k
                        }
                        busy = await f.fetch(
                            pool,
                            "SELECT state FROM pg_stat_activity WHERE datname = current_database()"
                            " AND pid <> pg_backend_pid() AND state <> 'idle'",
                        )
                        if in_use and not any(in_use.values()) and not busy:
                            break
                        assert time.monotonic() < deadline_at, (in_use, busy)
                        await asyncio.sleep(0.1)
            finally:
                side.kill()
            assert outcomes.get("cancelled", 0) + outcomes.get("deadline", 0) > total // 4
            assert overshoot < 1.0, overshoot  # cut at its deadline, not hanging past it
            result = await books(pool, tenants)
            assert result == {k: 0 for k in result}, result
            report(
                "calls cancelled or cut by deadlines of a few ms",
                load=total,
                load_unit="calls",
                faults=outcomes.get("cancelled", 0) + outcomes.get("deadline", 0),
                lost=0,
                counted_twice=result["requests_counted_twice"],
                applied_twice=result["claimed_but_uncounted"],
                notes=f"{outcomes}; no connection in use, no transaction open afterwards; "
                f"a deadline overrun by {overshoot * 1000:.1f} ms at most",
            )


async def test_a_reservation_whose_holder_died_comes_back_after_its_ttl(
    server_url: str, tmp_path: Path
) -> None:
    with fresh_database(server_url, "bp_holder") as url:
        async with pool_of(url) as pool:
            now = datetime.now(UTC)
            plan = await f.plan(pool, now, "holder", [quota("messages", "daily", 10)])
            tenant = await f.tenant(pool, now, "holder", plan)
            side = sidecar(url, tmp_path / "sidecar.log")
            side.start()
            try:
                await side.serving()
                async with grpc.aio.insecure_channel(side.target) as channel:
                    stub: Any = pb_grpc.QuotaServiceStub(channel)

                    async def consume(rid: str) -> Any:
                        return await stub.CheckAndConsume(
                            pb.CheckAndConsumeRequest(
                                tenant_id=tenant, resource="messages", amount=10, request_id=rid
                            ),
                            timeout=5,
                        )

                    # the holder reserves everything and dies: no commit, no release
                    await _reserve_and_die(side.target, tenant)
                    assert not (await consume("while-held")).allowed
                    [(expires_at,)] = await f.fetch(
                        pool, "SELECT expires_at FROM reservations WHERE tenant_id = %s", tenant
                    )
                    await asyncio.sleep(
                        max(0.0, (expires_at - datetime.now(UTC)).total_seconds()) + 0.2
                    )
                    assert (await consume("after-ttl")).allowed  # its quota came back
            finally:
                side.kill()
            [(status,)] = await f.fetch(
                pool, "SELECT status FROM reservations WHERE tenant_id = %s", tenant
            )
            assert status == "expired"
            assert (await books(pool, [tenant]))["windows_off_records"] == 0


async def _reserve_and_die(target: str, tenant: str) -> None:
    """A client process that reserves (TTL 2 s) and is SIGKILLed before it can settle."""
    script = (
        "import os, signal, grpc\n"
        "from quota.v1 import quota_service_pb2 as pb, quota_service_pb2_grpc as g\n"
        f"stub = g.QuotaServiceStub(grpc.insecure_channel({target!r}))\n"
        f"held = stub.Reserve(pb.ReserveRequest(tenant_id={tenant!r}, resource='messages',"
        " amount=10, request_id='holder', ttl_seconds=2), timeout=10)\n"
        "assert held.allowed\n"
        "print('held', flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE, cwd=ROOT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == -signal.SIGKILL and out.strip() == b"held", out
