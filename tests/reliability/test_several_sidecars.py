"""Three sidecar processes on one database, driven at once — CheckAndConsume, Reserve then
Commit or Release at another sidecar, retries of one request id sent to different sidecars —
on one hot tenant and on many: no window over its limit, nothing counted twice, `used` equal
to the sum of the records, every wallet equal to its ledger."""

from __future__ import annotations

import asyncio
import contextlib
import random
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from quota.v1 import quota_service_pb2 as pb
from quota.v1 import quota_service_pb2_grpc as pb_grpc

from bench.pooler import pgbouncer
from billing_core.billing.model import quota
from tests import factories as f
from tests.conftest import fresh_database
from tests.reliability.harness import (
    books,
    pool_of,
    report,
    running,
    scale,
    sidecar,
)

SIDECARS = 3
WORKERS = 24


@pytest.mark.parametrize("through", ["direct", "pgbouncer"])
async def test_three_sidecars_on_one_database_stay_exact(
    server_url: str, tmp_path: Path, through: str
) -> None:
    """`pgbouncer`: the sidecars reach the database through PgBouncer in transaction mode,
    with DB_PREPARED_STATEMENTS=off."""
    operations = 300 * scale()
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(fresh_database(server_url, "bp_three"))
        sidecar_url, env = url, {}
        if through == "pgbouncer":
            sidecar_url = stack.enter_context(pgbouncer(url))
            env = {"DB_PREPARED_STATEMENTS": "off"}
        await _three_sidecars(url, sidecar_url, env, tmp_path, operations, through)


async def _three_sidecars(
    url: str, sidecar_url: str, env: dict[str, str], tmp_path: Path, operations: int, through: str
) -> None:
    async with pool_of(url) as pool:
        now = datetime.now(UTC)
        plan = await f.plan(
            pool, now, "three",
            [quota("messages", "daily", 150), quota("tokens", "daily", 400)],
        )  # fmt: skip
        tenants = [await f.tenant(pool, now, f"three{n}", plan) for n in range(6)]
        sides = [sidecar(sidecar_url, tmp_path / f"sidecar{n}.log", **env) for n in range(SIDECARS)]
        replays = mismatched = 0
        with running(*sides):
            for s in sides:
                s.start()
            for s in sides:
                await s.serving()
            channels = [grpc.aio.insecure_channel(s.target) for s in sides]
            stubs: list[Any] = [pb_grpc.QuotaServiceStub(c) for c in channels]
            seen: dict[str, tuple[str, int, bool, str]] = {}  # rid → tenant, amount, answer
            rng = random.Random(3)
            todo = iter(range(operations))

            async def worker() -> None:
                nonlocal replays, mismatched
                for n in todo:
                    stub = rng.choice(stubs)
                    tenant = tenants[0] if rng.random() < 0.6 else rng.choice(tenants[1:])
                    roll = rng.random()
                    if roll < 0.2 and seen:  # a retry, at another sidecar
                        rid = rng.choice(sorted(seen))
                        t, amount, allowed, record = seen[rid]
                        a = await stub.CheckAndConsume(
                            pb.CheckAndConsumeRequest(
                                tenant_id=t, resource="messages", amount=amount,
                                request_id=rid,
                            ),
                            timeout=20,
                        )  # fmt: skip
                        if allowed:
                            replays += 1
                            mismatched += not (a.replayed and a.usage_record_id == record)
                    elif roll < 0.7:
                        rid, amount = f"c{n}", rng.randint(1, 3)
                        a = await stub.CheckAndConsume(
                            pb.CheckAndConsumeRequest(
                                tenant_id=tenant, resource="messages", amount=amount,
                                request_id=rid,
                            ),
                            timeout=20,
                        )  # fmt: skip
                        seen[rid] = (tenant, amount, a.allowed, a.usage_record_id)
                    else:  # reserve here, settle at another sidecar
                        held = await stub.Reserve(
                            pb.ReserveRequest(
                                tenant_id=tenant, resource="tokens", amount=20,
                                request_id=f"r{n}", ttl_seconds=60,
                            ),
                            timeout=20,
                        )  # fmt: skip
                        if not held.allowed:
                            continue
                        other = rng.choice(stubs)
                        if rng.random() < 0.7:
                            await other.Commit(
                                pb.CommitRequest(
                                    tenant_id=tenant, reservation_id=held.reservation_id,
                                    amount=rng.randint(1, 20),  # at most what it held
                                ),
                                timeout=20,
                            )  # fmt: skip
                        else:
                            await other.Release(
                                pb.ReleaseRequest(
                                    tenant_id=tenant, reservation_id=held.reservation_id
                                ),
                                timeout=20,
                            )

            try:
                await asyncio.gather(*(worker() for _ in range(WORKERS)))
            finally:
                for c in channels:
                    await c.close(grace=None)
        result = await books(pool, tenants)
        [(denied,)] = await f.fetch(
            pool,
            "SELECT count(*) FROM usage_counters WHERE tenant_id = %s AND resource ="
            " 'messages' AND used = 150",
            tenants[0],
        )
    assert mismatched == 0 and replays > 0
    assert result == {k: 0 for k in result}, result
    assert denied == 1  # the hot tenant reached its limit exactly, never past it
    report(
        "three sidecars on one database" + (", through PgBouncer" if through != "direct" else ""),
        load=operations,
        load_unit="calls",
        faults=0,
        lost=0,
        counted_twice=result["requests_counted_twice"] + mismatched,
        applied_twice=result["windows_off_records"] + result["windows_over_limit"],
        notes=f"{replays} retries sent to another sidecar replayed; the hot tenant ended at "
        "its limit exactly",
    )
