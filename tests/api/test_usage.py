"""Usage over HTTP: the same numbers as the sidecar, records (paginated, filtered, CSV
streamed in constant memory) and notifications."""

from __future__ import annotations

import csv
import io
import random
import tracemalloc
from typing import Any

import httpx
from psycopg_pool import AsyncConnectionPool
from quota_client import AsyncQuotaClient, pb

from quota_service.server import QuotaServer
from tests.api.conftest import assert_problem, make_plan, make_tenant

Pool = AsyncConnectionPool[Any]
PERIOD_NAMES = {
    pb.PERIOD_DAILY: "daily",
    pb.PERIOD_WEEKLY: "weekly",
    pb.PERIOD_MONTHLY: "monthly",
    pb.PERIOD_OVERALL: "overall",
    pb.PERIOD_CUMULATIVE: "cumulative",
}
STATE_NAMES = {
    pb.WINDOW_STATE_OK: "ok",
    pb.WINDOW_STATE_WARNING: "warning",
    pb.WINDOW_STATE_EXHAUSTED: "exhausted",
}


async def test_usage_agrees_with_the_sidecar_after_a_mixed_workload(
    api: httpx.AsyncClient, sidecar: QuotaServer, uid: str
) -> None:
    plan = await make_plan(
        api,
        uid,
        quotas=[
            {"resource": "messages", "period": "daily", "limit": 40},
            {"resource": "messages", "period": "monthly", "limit": 60},
            {"resource": "agents", "period": "cumulative", "limit": 5},
            {"resource": "tool_calls", "period": "weekly", "limit": 100},
        ],
    )
    t = (await make_tenant(api, f"t-{uid}", timezone="America/New_York"))["tenant_id"]
    await api.put(f"/v1/tenants/{t}/subscription", json={"plan_id": plan["plan_id"]})
    rng = random.Random(uid)
    async with AsyncQuotaClient(f"127.0.0.1:{sidecar.port}") as client:
        for i in range(60):
            kind = rng.choice(["consume", "reserve", "agent", "free"])
            if kind == "consume":
                await client.check_and_consume(t, "messages", rng.randint(1, 4))
            elif kind == "reserve":
                r = await client.reserve(t, "tool_calls", rng.randint(1, 9))
                if r.allowed and i % 3:
                    await r.commit(rng.randint(1, 9))  # some stay live reservations
            elif kind == "agent":
                await client.check_and_consume(t, "agents", 1)
            else:
                usage = await client.get_usage(t, resource="agents")
                if usage.resources and usage.resources[0].windows[0].used:
                    await client.free(t, "agents", 1)
        grpc_usage = await client.get_usage(t)
    http_usage = (await api.get(f"/v1/tenants/{t}/usage")).json()
    from_grpc = {
        r.resource: [
            (PERIOD_NAMES[w.period], w.limit, w.used, w.remaining, STATE_NAMES[w.state])
            for w in r.windows
        ]
        for r in grpc_usage.resources
    }
    from_http = {
        r["resource"]: [
            (w["period"], w["limit"], w["used"], w["remaining"], w["state"]) for w in r["windows"]
        ]
        for r in http_usage["resources"]
    }
    assert from_http == from_grpc
    assert sum(w[2] for ws in from_http.values() for w in ws) > 0  # the workload did count
    assert http_usage["plan_id"] == grpc_usage.plan_id == plan["plan_id"]
    assert http_usage["subscription_status"] == "active"
    assert_problem(await api.get(f"/v1/tenants/ghost-{uid}/usage"), 404, "not-found")


async def test_usage_records_filter_paginate_and_notify(
    api: httpx.AsyncClient, sidecar: QuotaServer, uid: str
) -> None:
    plan = await make_plan(
        api,
        uid,
        quotas=[
            {"resource": "messages", "period": "daily", "limit": 10, "warn_at": [50]},
            {"resource": "tool_calls", "period": "daily", "limit": 10},
        ],
    )
    t = (await make_tenant(api, f"t-{uid}"))["tenant_id"]
    await api.put(f"/v1/tenants/{t}/subscription", json={"plan_id": plan["plan_id"]})
    async with AsyncQuotaClient(f"127.0.0.1:{sidecar.port}") as client:
        for i in range(7):
            await client.check_and_consume(t, "messages", 1, labels={"n": str(i)})
        await client.check_and_consume(t, "tool_calls", 2)
    ids: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"resource": "messages", "limit": 3}
        if cursor:
            params["cursor"] = cursor
        page = (await api.get(f"/v1/tenants/{t}/usage-records", params=params)).json()
        ids += [r["usage_record_id"] for r in page["items"]]
        assert all(r["resource"] == "messages" for r in page["items"])
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert len(ids) == len(set(ids)) == 7
    everything = (await api.get(f"/v1/tenants/{t}/usage-records")).json()["items"]
    assert [r["labels"].get("n") for r in everything] == [*map(str, range(7)), None]
    late = everything[-1]["occurred_at"]
    later = (await api.get(f"/v1/tenants/{t}/usage-records", params={"since": late})).json()
    assert [r["resource"] for r in later["items"]] == ["tool_calls"]
    assert_problem(
        await api.get(f"/v1/tenants/{t}/usage-records", params={"since": "yesterday"}),
        422,
        "validation-error",
    )
    assert_problem(
        await api.get(f"/v1/tenants/{t}/usage-records", params={"since": late, "until": late}),
        422,
        "invalid-request",
    )
    notes = (await api.get(f"/v1/tenants/{t}/notifications")).json()["items"]
    assert [n["kind"] for n in notes] == ["threshold"]
    assert "50%" in notes[0]["message"]
    assert_problem(await api.get(f"/v1/tenants/ghost-{uid}/notifications"), 404, "not-found")


async def test_csv_export_of_100k_records_streams_in_constant_memory(
    api: httpx.AsyncClient, pool: Pool, uid: str
) -> None:
    t = (await make_tenant(api, f"t-{uid}"))["tenant_id"]
    async with pool.connection() as conn:
        await conn.execute(
            "INSERT INTO usage_records (tenant_id, usage_record_id, resource, amount, kind,"
            " request_id, cost_micros, labels, occurred_at)"
            " SELECT %s, 'ur_' || lpad(i::text, 8, '0'), 'tokens', i %% 1000 + 1, 'consume',"
            " 'req-' || i, i, jsonb_build_object('job', 'batch-' || (i %% 7)),"
            " timestamptz '2026-01-01' + i * interval '1 second'"
            " FROM generate_series(1, 100000) AS i",
            (t,),
        )
    rows = 0
    total_amount = 0
    bytes_seen = 0
    tracemalloc.start()
    try:
        async with api.stream(
            "GET", f"/v1/tenants/{t}/usage-records", headers={"Accept": "text/csv"}
        ) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/csv")
            header: list[str] | None = None
            pending = ""
            async for chunk in r.aiter_text():
                bytes_seen += len(chunk)
                pending += chunk
                lines = pending.split("\n")
                pending = lines.pop()
                for row in csv.reader(io.StringIO("\n".join(lines))):
                    if header is None:
                        header = row
                        continue
                    rows += 1
                    total_amount += int(row[header.index("amount")])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rows == 100_000
    assert total_amount == sum(i % 1000 + 1 for i in range(1, 100_001))
    # the export is far larger than anything held at once: it was streamed
    assert bytes_seen > 10_000_000
    # buffering would hold the whole text (and 100k row tuples) at once: > bytes_seen
    assert peak < bytes_seen / 2, (peak, bytes_seen)
    assert_problem(
        await api.get(f"/v1/tenants/ghost-{uid}/usage-records", headers={"Accept": "text/csv"}),
        404,
        "not-found",
    )
