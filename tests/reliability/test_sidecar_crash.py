"""The sidecar SIGKILLed under load, then started again: every answer that reached its
client is in the books, a retry of any request id gets the original decision (`replayed`),
nothing is counted twice, no window goes over its limit — and a kill between a batch's
writes and its commit leaves no request claimed but uncounted."""

from __future__ import annotations

import asyncio
import random
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from quota.v1 import quota_service_pb2 as pb
from quota.v1 import quota_service_pb2_grpc as pb_grpc

from billing_core.billing.model import quota
from tests import factories as f
from tests.conftest import fresh_database
from tests.reliability.harness import books, pool_of, report, scale, sidecar

IN_FLIGHT = 32
LIMIT = 400


async def retried_calls(
    stub: Any, calls: list[tuple[str, str]], in_flight: int = 64
) -> list[pb.CheckAndConsumeResponse]:
    """What a fleet of clients does after an outage: each sends its request again, with
    the same id, until it hears an answer (a few attempts, a few in flight at a time)."""
    gate = asyncio.Semaphore(in_flight)

    async def one(tenant: str, rid: str) -> pb.CheckAndConsumeResponse:
        async with gate:
            for attempt in range(10):
                try:
                    answer: pb.CheckAndConsumeResponse = await stub.CheckAndConsume(
                        request(tenant, rid), timeout=10
                    )
                    return answer
                except grpc.aio.AioRpcError as exc:
                    if exc.code() not in RETRYABLE or attempt == 9:
                        raise
                    await asyncio.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    return await asyncio.gather(*(one(t, rid) for t, rid in calls))


RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}


def request(tenant: str, request_id: str) -> pb.CheckAndConsumeRequest:
    return pb.CheckAndConsumeRequest(
        tenant_id=tenant, resource="messages", amount=1, request_id=request_id
    )


async def test_killed_with_calls_in_flight_then_restarted(server_url: str, tmp_path: Path) -> None:
    kills = 2 * scale()
    with fresh_database(server_url, "bp_crash") as url:
        async with pool_of(url) as pool:
            now = datetime.now(UTC)
            plan = await f.plan(pool, now, "crash", [quota("messages", "daily", LIMIT)])
            tenants = [await f.tenant(pool, now, f"crash{n}", plan) for n in range(4)]
            side = sidecar(url, tmp_path / "sidecar.log")
            answered: dict[str, tuple[str, bool, str]] = {}  # request id → tenant, allowed, rec
            unanswered: dict[str, str] = {}  # request id → tenant
            sent = 0
            try:
                for cycle in range(kills):
                    side.start()
                    await side.serving()
                    stop = asyncio.Event()

                    async with grpc.aio.insecure_channel(side.target) as channel:
                        stub = pb_grpc.QuotaServiceStub(channel)

                        async def caller(worker: int, stub: Any, stop: asyncio.Event) -> None:
                            nonlocal sent
                            rng = random.Random(f"{cycle}-{worker}")  # noqa: B023
                            n = 0
                            while not stop.is_set():
                                # one hot tenant, three others
                                tenant = tenants[0 if rng.random() < 0.7 else rng.randrange(1, 4)]
                                rid = f"c{cycle}-w{worker}-{n}"  # noqa: B023
                                n += 1
                                sent += 1
                                try:
                                    answer = await stub.CheckAndConsume(
                                        request(tenant, rid), timeout=5
                                    )
                                except grpc.aio.AioRpcError:
                                    unanswered[rid] = tenant
                                    return
                                answered[rid] = (tenant, answer.allowed, answer.usage_record_id)

                        workers = [
                            asyncio.create_task(caller(w, stub, stop)) for w in range(IN_FLIGHT)
                        ]
                        await asyncio.sleep(0.6 + random.random())
                        side.kill()  # 32 calls in flight
                        stop.set()
                        await asyncio.gather(*workers)
                assert unanswered, "the kill interrupted no call"

                side.start()
                await side.serving()
                async with grpc.aio.insecure_channel(side.target) as channel:
                    stub = pb_grpc.QuotaServiceStub(channel)
                    # the clients retry what they never heard back about, with the same ids
                    retried = await retried_calls(stub, [(t, rid) for rid, t in unanswered.items()])
                    # and some of what they did hear allowed: the original decision again (a
                    # denial is not kept: its retry is decided afresh)
                    admitted = sorted(rid for rid, (_, ok, _) in answered.items() if ok)
                    sample = random.Random(1).sample(admitted, min(200, len(admitted)))
                    again = await retried_calls(stub, [(answered[rid][0], rid) for rid in sample])
            finally:
                side.kill()
            for rid, answer in zip(sample, again, strict=True):
                _, allowed, record = answered[rid]
                assert answer.replayed and (answer.allowed, answer.usage_record_id) == (
                    allowed,
                    record,
                ), rid
            committed_before_kill = sum(a.replayed for a in retried)

            records = {
                rid: rec
                for rid, rec in await f.fetch(
                    pool,
                    "SELECT request_id, usage_record_id FROM usage_records"
                    " WHERE tenant_id = ANY(%s)",
                    tenants,
                )
            }
            lost = [
                rid
                for rid, (_, allowed, rec) in answered.items()
                if allowed and records.get(rid) != rec
            ]
            result = await books(pool, tenants)
            assert lost == []
            assert result == {k: 0 for k in result}, result
            admitted_total = sum(ok for _, ok, _ in answered.values())
            assert len(records) == admitted_total + sum(a.allowed for a in retried)
            report(
                "sidecar killed with 32 calls in flight",
                load=sent + len(unanswered) + len(sample),
                load_unit="calls",
                faults=kills,
                lost=len(lost),
                counted_twice=result["requests_counted_twice"],
                applied_twice=result["windows_off_records"] + result["windows_over_limit"],
                notes=f"{len(unanswered)} interrupted, {committed_before_kill} of them had "
                "been committed (their retry was replayed)",
            )


FAULT_TRIGGER = """
CREATE TABLE fault_pause (seconds double precision NOT NULL);
CREATE FUNCTION fault_pause() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_sleep(coalesce((SELECT max(seconds) FROM fault_pause), 0));
  RETURN NULL;
END $$;
CREATE TRIGGER fault_pause AFTER INSERT ON usage_records
  FOR EACH STATEMENT EXECUTE FUNCTION fault_pause();
"""


@pytest.mark.parametrize("connection_cut", [False, True], ids=["commit-sent", "connection-cut"])
async def test_killed_between_a_batchs_writes_and_its_commit(
    server_url: str, tmp_path: Path, connection_cut: bool
) -> None:
    """A batch's writes go out with its COMMIT (one round trip). The batch is paused in the
    database after its writes (a trigger sleeps) and the sidecar is SIGKILLed there: the
    database still holds the COMMIT and commits the batch whole. With the connection cut as
    well (the backend terminated in its pause), the batch is rolled back whole. Either way
    no request is claimed without its record, and the retries count each request once."""
    with fresh_database(server_url, "bp_midbatch") as url:
        async with pool_of(url) as pool:
            now = datetime.now(UTC)
            plan = await f.plan(pool, now, "mid", [quota("messages", "daily", 100)])
            tenants = [await f.tenant(pool, now, f"mid{n}", plan) for n in range(3)]
            async with pool.connection() as conn:
                await conn.execute(FAULT_TRIGGER)
                await conn.execute("INSERT INTO fault_pause VALUES (2)")
            side = sidecar(url, tmp_path / "sidecar.log")
            ids = [(tenants[n % 3], f"mid-{n}") for n in range(12)]
            try:
                side.start()
                await side.serving()
                async with grpc.aio.insecure_channel(side.target) as channel:
                    stub = pb_grpc.QuotaServiceStub(channel)
                    calls = [
                        asyncio.ensure_future(stub.CheckAndConsume(request(t, r), timeout=20))
                        for t, r in ids
                    ]
                    # wait until a batch has written its rows and is paused before COMMIT
                    deadline = time.monotonic() + 10
                    while not await f.fetch(
                        pool,
                        "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                        " AND wait_event = 'PgSleep'",
                    ):
                        assert time.monotonic() < deadline, "no batch reached its writes"
                        await asyncio.sleep(0.05)
                    side.kill()
                    if connection_cut:
                        # every paused batch (a lane goes on beside a stalled batch, so
                        # there may be two), also one whose statements were still on the way
                        quiet_since = time.monotonic()
                        while time.monotonic() - quiet_since < 0.5:
                            if await f.fetch(
                                pool,
                                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                                " WHERE datname = current_database() AND wait_event = 'PgSleep'",
                            ):
                                quiet_since = time.monotonic()
                            await asyncio.sleep(0.02)
                    answers = await asyncio.gather(*calls, return_exceptions=True)
                    assert all(isinstance(a, grpc.aio.AioRpcError) for a in answers)
                async with pool.connection() as conn:
                    await conn.execute("DELETE FROM fault_pause")
                # wait until the dead sidecar's sessions have all ended
                deadline = time.monotonic() + 20
                while await f.fetch(
                    pool,
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                    " AND pid <> pg_backend_pid() AND state <> 'idle'",
                ):
                    assert time.monotonic() < deadline, "the paused transaction never ended"
                    await asyncio.sleep(0.1)
                claimed = await f.fetch(
                    pool,
                    "SELECT request_id FROM idempotency_keys WHERE tenant_id = ANY(%s) ORDER BY 1",
                    tenants,
                )
                counted = await f.fetch(
                    pool,
                    "SELECT request_id FROM usage_records WHERE tenant_id = ANY(%s) ORDER BY 1",
                    tenants,
                )
                assert claimed == counted
                assert (counted == []) is connection_cut
                assert (await books(pool, tenants))["claimed_but_uncounted"] == 0
                side.start()
                await side.serving()
                async with grpc.aio.insecure_channel(side.target) as channel:
                    stub = pb_grpc.QuotaServiceStub(channel)
                    retried = await asyncio.gather(
                        *(stub.CheckAndConsume(request(t, r), timeout=10) for t, r in ids)
                    )
            finally:
                side.kill()
            assert all(a.allowed for a in retried)
            assert sum(a.replayed for a in retried) == len(counted)
            result = await books(pool, tenants)
            assert result == {k: 0 for k in result}, result
            [(n,)] = await f.fetch(
                pool, "SELECT count(*) FROM usage_records WHERE tenant_id = ANY(%s)", tenants
            )
            assert n == len(ids)
            report(
                "sidecar killed between a batch's writes and its commit"
                + (", its connection cut" if connection_cut else ""),
                load=2 * len(ids),
                load_unit="calls",
                faults=1,
                lost=0,
                counted_twice=result["requests_counted_twice"],
                applied_twice=result["claimed_but_uncounted"],
                notes=(
                    "the paused batch rolled back whole"
                    if connection_cut
                    else f"the paused batch committed whole ({len(counted)} requests)"
                )
                + f"; none of the {len(ids)} claimed without its record; each counted once"
                " after the retries",
            )
