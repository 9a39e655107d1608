"""The coalescer and the coalescing sidecar: exact under 64 callers, a tenant locked elsewhere
stalls only itself, batched and lone settlements of the same reservations settle each once."""

from __future__ import annotations

import asyncio
from typing import Any

from quota_client import AsyncQuotaClient

from billing_core.billing.model import quota
from billing_core.clock import FrozenClock
from billing_core.db.pool import open_pool
from billing_core.errors import QuotaError
from billing_core.quota.answers import CommitResult
from billing_core.quota.engine import QuotaRules
from billing_core.quota.requests import (
    CommitRequest,
    ConsumeRequest,
    ReleaseRequest,
    Request,
    ReserveRequest,
)
from quota_service.coalescer import Coalescer
from quota_service.server import QuotaServer
from tests import factories as f
from tests.integration.batching import Pool
from tests.integration.test_properties import START

MODEL = "coalesce-model"


async def test_the_coalescing_sidecar_is_exact_under_64_callers(
    sidecar: QuotaServer, pool: Pool, uid: str
) -> None:
    assert sidecar.coalescer is not None
    now = START
    plan = await f.plan(pool, now, uid, [quota("tool_calls", "daily", 1000)])
    t = await f.tenant(pool, now, f"t-{uid}", plan)
    before = sidecar.coalescer.batches
    async with AsyncQuotaClient(f"127.0.0.1:{sidecar.port}") as client:

        async def caller(c: int) -> list[bool]:
            out = []
            for i in range(20):
                d = await client.check_and_consume(t, "tool_calls", 1, request_id=f"{c}-{i}")
                again = await client.check_and_consume(t, "tool_calls", 1, request_id=f"{c}-{i}")
                assert again.allowed == d.allowed and (not d.allowed or again.replayed)
                out.append(d.allowed)
            return out

        results = await asyncio.gather(*(caller(c) for c in range(64)))
    assert sum(sum(r) for r in results) == 1000
    [(used, records)] = await f.fetch(
        pool,
        "SELECT (SELECT sum(used) FROM usage_counters WHERE tenant_id = %s),"
        " (SELECT sum(amount) FROM usage_records WHERE tenant_id = %s)",
        t,
        t,
    )
    assert used == records == 1000
    # requests really shared transactions
    assert sidecar.coalescer.batches - before < 64 * 20 * 2


async def test_reserve_and_commit_through_the_coalescing_sidecar_are_exact_under_64_callers(
    sidecar: QuotaServer, pool: Pool, uid: str
) -> None:
    """Each caller reserves 3 and commits 2 (then commits again: a replay), or releases
    every fifth reservation (twice: the second finds it released); about 500 Reserves
    commit before 1,000 a day is reached, and nothing stays reserved."""
    assert sidecar.coalescer is not None
    plan = await f.plan(pool, START, uid, [quota("tool_calls", "daily", 1000)])
    t = await f.tenant(pool, START, f"rc-{uid}", plan)
    before = sidecar.coalescer.requests
    async with AsyncQuotaClient(f"127.0.0.1:{sidecar.port}") as client:

        async def caller(c: int) -> int:
            committed = 0
            for i in range(10):
                held = await client.reserve(t, "tool_calls", 3, request_id=f"{c}-{i}")
                if not held.allowed:
                    continue
                if i % 5 == 4:
                    assert (await client.release(t, held.reservation_id)).released
                    assert not (await client.release(t, held.reservation_id)).released
                    continue
                first = await held.commit(2)
                again = await client.commit(t, held.reservation_id, 2)
                assert again.usage_record_id == first.usage_record_id
                committed += 2
            return committed

        committed = sum(await asyncio.gather(*(caller(c) for c in range(64))))
    [(used, reserved, records, open_reservations)] = await f.fetch(
        pool,
        "SELECT (SELECT sum(used) FROM usage_counters WHERE tenant_id = %s),"
        " (SELECT sum(reserved) FROM usage_counters WHERE tenant_id = %s),"
        " (SELECT sum(amount) FROM usage_records WHERE tenant_id = %s),"
        " (SELECT count(*) FROM reservations WHERE tenant_id = %s AND status <> 'committed')",
        t,
        t,
        t,
        t,
    )
    assert (used, reserved, records) == (committed, 0, committed)
    [(released,)] = await f.fetch(
        pool, "SELECT count(*) FROM reservations WHERE tenant_id = %s AND status = 'released'", t
    )
    assert open_reservations == released  # none left active
    assert 900 < committed <= 1000 and committed % 2 == 0
    # Reserve, Commit and Release went through the lanes
    assert sidecar.coalescer.requests - before >= 64 * 10


async def test_a_row_lock_held_elsewhere_stalls_its_tenant_not_the_lane(
    database_url: str, pool: Pool, uid: str
) -> None:
    """Another transaction holds one tenant's counter row: the batch with that tenant's
    request waits on it, and everyone else's requests are decided beside it meanwhile —
    those that came later in batches of their own, those in the same batch once it gives
    up at its lock timeout and decides its requests one by one; the tenant's next request
    waits for the first and counts after it."""
    lane = await open_pool(database_url, 1)
    rules = QuotaRules(batch_lock_timeout_s=0.3)
    engine = f.engine(pool, FrozenClock(START), rules, batch_pool=lane)
    coalescer = Coalescer(engine, lanes=1, gather_s=0, stall_s=0.05)
    coalescer.start()
    try:
        plan = await f.plan(pool, START, uid, [quota("messages", "daily", 100)])
        stuck = await f.tenant(pool, START, f"stuck-{uid}", plan)
        others = [await f.tenant(pool, START, f"free{i}-{uid}", plan) for i in range(5)]
        assert (await coalescer.admit(ConsumeRequest(stuck, "messages", 1, "s0"))).allowed
        async with pool.connection() as blocker, blocker.transaction():
            await blocker.execute(
                "SELECT 1 FROM usage_counters WHERE tenant_id = %s FOR UPDATE", (stuck,)
            )
            # queued in one loop turn: one batch, the stuck tenant's request among others'
            first = asyncio.ensure_future(
                coalescer.admit(ConsumeRequest(stuck, "messages", 1, "s1"))
            )
            beside = [
                asyncio.ensure_future(coalescer.admit(ConsumeRequest(t, "messages", 1, "o")))
                for t in others[:2]
            ]
            await asyncio.sleep(0.1)
            later = asyncio.ensure_future(
                coalescer.admit(ConsumeRequest(stuck, "messages", 1, "s2"))
            )
            rest = [
                asyncio.ensure_future(coalescer.admit(ConsumeRequest(t, "messages", 1, "o")))
                for t in others[2:]
            ]
            done, _ = await asyncio.wait([*beside, *rest], timeout=10)
            assert done == {*beside, *rest} and all(r.result().allowed for r in done)
            assert not first.done() and not later.done()
            assert coalescer.overtaken == 1 and engine.stats.fallbacks["locked"] == 1
        a, b = await asyncio.wait_for(asyncio.gather(first, later), 10)
        assert [a.windows[0].used, b.windows[0].used] == [2, 3]
        assert [r.result().windows[0].used for r in beside] == [1, 1]
    finally:
        await coalescer.stop()
        await lane.close()


async def test_batched_commits_racing_one_by_one_commits_and_releases_settle_each_reservation_once(
    database_url: str, pool: Pool, uid: str
) -> None:
    """Two sidecars at once (one batching on its own connection, one deciding one by one):
    for each reservation a batched Commit races a one-by-one Commit of the same values or a
    Release, or a batched Release races a one-by-one Commit. Each reservation ends committed
    once (both Commits answer with the same record) or released (the Commit refused);
    nothing stays reserved or is counted twice."""
    lane = await open_pool(database_url, 1)
    try:
        clock = FrozenClock(START)
        batching = f.engine(pool, clock, QuotaRules(), batch_pool=lane)
        alone = f.engine(pool, clock, QuotaRules())
        plan = await f.plan(pool, START, uid, [quota("tool_calls", "daily", 10_000)])
        t = await f.tenant(pool, START, f"race-{uid}", plan)
        held = [
            (await alone.reserve(ReserveRequest(t, "tool_calls", 5, f"h{i}"))).reservation_id
            for i in range(40)
        ]

        async def one_by_one(reservation_id: str, i: int) -> Any:
            if i % 3 == 0:
                return await alone.release(ReleaseRequest(t, reservation_id))
            try:
                return await alone.commit(CommitRequest(t, reservation_id, 4))
            except QuotaError as exc:
                return exc

        for start in range(0, len(held), 8):  # batches of 8 against 8 single calls
            chunk = held[start : start + 8]
            batch: list[Request] = [
                ReleaseRequest(t, r) if (start + j) % 3 == 2 else CommitRequest(t, r, 4)
                for j, r in enumerate(chunk)
            ]
            batched, *singles = await asyncio.gather(
                batching.run_batch(batch),
                *(one_by_one(r, start + j) for j, r in enumerate(chunk)),
            )
            for j, (mine, theirs) in enumerate(zip(batched, singles, strict=True)):
                if (start + j) % 3 == 0:  # a Commit raced a Release: exactly one of them won
                    assert isinstance(mine, CommitResult) != (theirs is True), (mine, theirs)
                elif (start + j) % 3 == 2:  # a Release raced a Commit: the same
                    assert (mine is True) != isinstance(theirs, CommitResult), (mine, theirs)
                else:  # raced a Commit: one record, answered twice
                    assert isinstance(mine, CommitResult) and isinstance(theirs, CommitResult)
                    assert mine.usage_record_id == theirs.usage_record_id
                    assert mine.replayed != theirs.replayed
    finally:
        await lane.close()
    [(used, reserved, records, committed, released)] = await f.fetch(
        pool,
        "SELECT (SELECT sum(used) FROM usage_counters WHERE tenant_id = %s),"
        " (SELECT sum(reserved) FROM usage_counters WHERE tenant_id = %s),"
        " (SELECT count(*) FROM usage_records WHERE tenant_id = %s),"
        " (SELECT count(*) FROM reservations WHERE tenant_id = %s AND status = 'committed'),"
        " (SELECT count(*) FROM reservations WHERE tenant_id = %s AND status = 'released')",
        t,
        t,
        t,
        t,
        t,
    )
    assert committed + released == 40 and reserved == 0
    assert (used, records) == (4 * committed, committed)
