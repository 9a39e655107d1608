"""The typed HTTP client in clients/python, checked against the live /openapi.json."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from quota_client.admin import OPERATIONS, AdminClient, ApiError, AsyncAdminClient

from tests.conftest import ControlPlane


async def test_client_operations_match_the_openapi_document(control_plane: ControlPlane) -> None:
    async with httpx.AsyncClient(base_url=control_plane.url) as http:
        doc = (await http.get("/openapi.json")).json()
    assert doc["openapi"].startswith("3.1")
    served = {
        op["operationId"]: (method.upper(), path)
        for path, ops in doc["paths"].items()
        for method, op in ops.items()
    }
    assert served == OPERATIONS
    for operation in OPERATIONS:
        assert callable(getattr(AdminClient, operation)), operation


async def test_sync_client_round_trip(control_plane: ControlPlane, uid: str) -> None:
    def scenario() -> tuple[dict[str, object], list[str], int]:
        with AdminClient(control_plane.url, control_plane.key) as admin:
            plan = admin.create_plan(
                name=f"client-{uid}",
                quotas=[{"resource": "files", "period": "cumulative", "limit": 3}],
            )
            admin.create_tenant(f"c-{uid}", "Client Co", timezone="Asia/Tokyo")
            admin.put_subscription(f"c-{uid}", plan["plan_id"])
            admin.create_wallet_grant(f"c-{uid}", 42, "test", idempotency_key=f"k-{uid}")
            admin.create_wallet_grant(f"c-{uid}", 42, "test", idempotency_key=f"k-{uid}")
            names = [p["name"] for p in admin.iter_plans(active=True)]
            with pytest.raises(ApiError) as caught:
                admin.get_tenant(f"ghost-{uid}")
            assert caught.value.status == 404 and caught.value.type == "/problems/not-found"
            lines = list(admin.export_usage_csv(f"c-{uid}"))
            return admin.get_wallet(f"c-{uid}"), names, len(lines)

    # the server runs on this event loop: the blocking client goes to a thread
    wallet, names, csv_lines = await asyncio.to_thread(scenario)
    assert wallet["balance_micros"] == 42
    assert f"client-{uid}" in names
    assert csv_lines == 1  # the header: no usage yet


async def test_async_client_pages_and_errors(control_plane: ControlPlane, uid: str) -> None:
    async with AsyncAdminClient(control_plane.url, control_plane.key) as admin:
        for i in range(3):
            await admin.call("create_tenant", json={"tenant_id": f"a-{uid}-{i}", "name": "A"})
        ids = [t["tenant_id"] async for t in admin.iter_pages("list_tenants", limit=2)]
        assert {f"a-{uid}-{i}" for i in range(3)} <= set(ids)
        with pytest.raises(ApiError) as caught:
            await admin.call("create_plan", json={"name": ""})
        assert caught.value.status == 422 and caught.value.errors
