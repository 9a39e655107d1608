"""An authenticated HTTP client for the live control plane, and helpers to make data."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.conftest import ControlPlane


@pytest.fixture
async def api(control_plane: ControlPlane) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {control_plane.key}"}
    async with httpx.AsyncClient(base_url=control_plane.url, headers=headers) as client:
        yield client


async def make_plan(api: httpx.AsyncClient, uid: str, **fields: Any) -> dict[str, Any]:
    body = {
        "name": f"plan-{uid}",
        "quotas": [{"resource": "messages", "period": "daily", "limit": 10}],
        **fields,
    }
    r = await api.post("/v1/plans", json=body)
    assert r.status_code == 201, r.text
    result: dict[str, Any] = r.json()
    return result


async def make_tenant(api: httpx.AsyncClient, tenant_id: str, **fields: Any) -> dict[str, Any]:
    r = await api.post("/v1/tenants", json={"tenant_id": tenant_id, "name": "T", **fields})
    assert r.status_code == 201, r.text
    result: dict[str, Any] = r.json()
    return result


def assert_problem(r: httpx.Response, status: int, slug: str, text: str = "") -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = r.json()
    assert body["type"] == f"/problems/{slug}" and body["status"] == status
    assert text in body["detail"], body
    return body
