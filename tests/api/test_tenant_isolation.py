"""Tenant isolation through the API and the sidecar: every read under /v1/tenants/{A}
shows nothing of tenant B, every change under /v1/tenants/{A} leaves every row of B as it
was, and one request id used by two tenants is two requests."""

from __future__ import annotations

import json
from typing import Any

import grpc
import httpx
from psycopg_pool import AsyncConnectionPool
from quota.v1 import quota_service_pb2 as pb
from quota.v1 import quota_service_pb2_grpc as pb_grpc

from quota_service.server import QuotaServer
from tests import factories as f
from tests.api.conftest import make_plan, make_tenant

Pool = AsyncConnectionPool[Any]


async def _rows_of(pool: Pool, tenant: str) -> dict[str, list[str]]:
    """Every row of every table with a tenant_id, for one tenant."""
    tables = await f.fetch(
        pool,
        "SELECT table_name FROM information_schema.columns WHERE column_name = 'tenant_id'"
        " AND table_schema = 'public' ORDER BY 1",
    )
    out = {}
    for (table,) in tables:
        rows = await f.fetch(
            pool, f'SELECT row_to_json(t)::text FROM "{table}" t WHERE tenant_id = %s', tenant
        )
        out[table] = sorted(r[0] for r in rows)
    return out


async def _busy_tenant(
    api: httpx.AsyncClient, sidecar: QuotaServer, tenant: str, plan: str
) -> None:
    """A tenant with a plan, usage, a wallet grant, overrides and notifications."""
    await make_tenant(api, tenant)
    assert (
        await api.put(f"/v1/tenants/{tenant}/subscription", json={"plan_id": plan})
    ).status_code == 200
    r = await api.post(
        f"/v1/tenants/{tenant}/wallet/grants", json={"amount_micros": 5000, "reason": "gift"}
    )
    assert r.status_code == 201, r.text
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel:
        stub: Any = pb_grpc.QuotaServiceStub(channel)
        for n in range(10):  # past the daily limit of 8: warnings and a denial
            await stub.CheckAndConsume(
                pb.CheckAndConsumeRequest(
                    tenant_id=tenant, resource="messages", amount=1, request_id=f"same-{n}",
                    labels={"marker": f"marker-of-{tenant}"},
                ),
                timeout=10,
            )  # fmt: skip


async def test_reads_and_changes_for_one_tenant_touch_nothing_of_another(
    api: httpx.AsyncClient, sidecar: QuotaServer, pool: Pool, uid: str
) -> None:
    plan = (await make_plan(api, uid, quotas=[
        {"resource": "messages", "period": "daily", "limit": 8}]))["plan_id"]  # fmt: skip
    other_plan = (await make_plan(api, f"{uid}-2"))["plan_id"]
    a, b = f"iso-a-{uid}", f"iso-b-{uid}"
    await _busy_tenant(api, sidecar, a, plan)
    await _busy_tenant(api, sidecar, b, plan)
    b_before = await _rows_of(pool, b)
    assert b_before["usage_records"] and b_before["wallet_grants"] and b_before["notifications"]
    b_records = [json.loads(r)["usage_record_id"] for r in b_before["usage_records"]]

    # every read of A: nothing of B in it
    document = (await api.get("/openapi.json")).json()
    reads = [p for p, ops in document["paths"].items() if "{tenant_id}" in p and "get" in ops]
    assert len(reads) >= 7
    for path in reads:
        r = await api.get(path.replace("{tenant_id}", a), params={"limit": 100})
        assert r.status_code == 200, (path, r.text)
        for foreign in (b, f"marker-of-{b}", *b_records):
            assert foreign not in r.text, (path, foreign)

    # every kind of change of A: every row of B as it was
    changes = [
        (
            "put",
            "/overrides",
            {"quotas": [{"resource": "messages", "period": "daily", "limit": 3}]},
        ),
        ("post", "/wallet/grants", {"amount_micros": 7, "reason": "isolation"}),
        ("put", "/subscription", {"plan_id": other_plan}),
        ("post", "/trial", {"plan_id": plan}),
        ("post", "/billing-links", {}),
        ("post", "/subscription/cancel", {"cancel_at_period_end": True}),
    ]
    for method, suffix, body in changes:
        r = await api.request(method.upper(), f"/v1/tenants/{a}{suffix}", json=body)
        assert r.status_code < 500, (suffix, r.text)
    assert await _rows_of(pool, b) == b_before


async def test_one_request_id_used_by_two_tenants_is_two_requests(
    api: httpx.AsyncClient, sidecar: QuotaServer, pool: Pool, uid: str
) -> None:
    plan = (await make_plan(api, uid))["plan_id"]
    a, b = f"rid-a-{uid}", f"rid-b-{uid}"
    for t in (a, b):
        await make_tenant(api, t)
        await api.put(f"/v1/tenants/{t}/subscription", json={"plan_id": plan})
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel:
        stub: Any = pb_grpc.QuotaServiceStub(channel)
        answers = [
            await stub.CheckAndConsume(
                pb.CheckAndConsumeRequest(
                    tenant_id=t, resource="messages", amount=n, request_id="shared-id"
                ),
                timeout=10,
            )
            for n, t in ((2, a), (3, b))
        ]
    assert [x.replayed for x in answers] == [False, False]
    assert answers[0].usage_record_id != answers[1].usage_record_id
    rows = await f.fetch(
        pool,
        "SELECT tenant_id, amount FROM usage_records WHERE request_id = 'shared-id'"
        " AND tenant_id = ANY(%s) ORDER BY tenant_id",
        [a, b],
    )
    assert rows == [(a, 2), (b, 3)]
