"""Plans and tenants over HTTP: success and every error path, pagination, audit log."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from psycopg_pool import AsyncConnectionPool
from starlette.routing import Route

from tests import factories as f
from tests.api.conftest import assert_problem, make_plan, make_tenant
from tests.conftest import ControlPlane

Pool = AsyncConnectionPool[Any]


async def test_every_v1_route_refuses_a_missing_or_wrong_key(control_plane: ControlPlane) -> None:
    routes = [r for r in control_plane.app.routes if isinstance(r, Route)]
    v1 = [(m, r.path) for r in routes if r.path.startswith("/v1/") for m in r.methods or ()]
    assert len(v1) >= 20  # every operation of the contract is enumerated
    async with httpx.AsyncClient(base_url=control_plane.url) as anon:
        for method, path in v1:
            url = path.format(
                tenant_id="t", plan_id="p", provider="x", model="y", event_id="e", api_key_id="k"
            )
            for headers in ({}, {"Authorization": "Bearer bpk_wrong"}, {"Authorization": "x"}):
                r = await anon.request(method, url, headers=headers, json={})
                if method == "HEAD":  # no body to read
                    assert r.status_code == 401
                    continue
                assert_problem(r, 401, "unauthenticated")
                assert r.headers["www-authenticate"] == "Bearer"


async def test_plan_lifecycle_create_get_patch_archive_with_audit(
    api: httpx.AsyncClient, pool: Pool, uid: str
) -> None:
    plan = await make_plan(
        api,
        uid,
        price_cents=2000,
        trial=True,
        trial_days=14,
        wallet_grants=[{"on": "start", "amount_micros": 5_000_000, "expires_after_days": 30}],
    )
    assert plan["version"] == 1 and plan["quotas"][0]["warn_at"] == [80, 95]
    got = (await api.get(f"/v1/plans/{plan['plan_id']}")).json()
    assert got == plan
    r = await api.patch(
        f"/v1/plans/{plan['plan_id']}",
        json={
            "price_cents": 2500,
            "quotas": [
                {"resource": "tokens", "period": "daily", "limit": 1000, "overage": "wallet"},
                {"resource": "tokens", "period": "monthly", "limit": 20_000},
            ],
        },
    )
    assert r.status_code == 200, r.text
    patched = r.json()
    assert patched["version"] == 2 and patched["price_cents"] == 2500
    assert [q["period"] for q in patched["quotas"]] == ["daily", "monthly"]
    assert patched["wallet_grants"] == plan["wallet_grants"]  # untouched lists stay
    archived = (await api.post(f"/v1/plans/{plan['plan_id']}/archive")).json()
    assert archived["active"] is False and archived["version"] == 3
    # the name is free again among active plans
    await make_plan(api, uid)
    rows = await f.fetch(
        pool,
        "SELECT action, before IS NULL, after->'spec'->>'price_cents' FROM audit_log"
        " WHERE entity_id = %s ORDER BY audit_id",
        plan["plan_id"],
    )
    assert rows == [
        ("plan.create", True, "2000"),
        ("plan.update", False, "2500"),
        ("plan.archive", False, "2500"),
    ]


@pytest.mark.parametrize(
    ("body", "status", "slug", "text"),
    [
        ({"quotas": []}, 422, "validation-error", "body does not match"),
        ({"name": "x", "price_cents": -1}, 422, "validation-error", ""),
        ({"name": "x", "price_cents": "100"}, 422, "validation-error", ""),
        ({"name": "x", "trial": True, "trial_days": 0}, 422, "invalid-request", "trial_days"),
        (
            {
                "name": "x",
                "quotas": [
                    {"resource": "messages", "period": "daily", "limit": 1},
                    {"resource": "messages", "period": "daily", "limit": 2},
                ],
            },
            422,
            "invalid-request",
            "duplicate quota",
        ),
        (
            {"name": "x", "quotas": [{"resource": "gold", "period": "daily", "limit": 1}]},
            422,
            "validation-error",
            "",
        ),
        ({"name": "x", "surprise": 1}, 422, "validation-error", ""),
    ],
    ids=["no-name", "negative-price", "price-as-text", "trial-0-days", "dup-quota",
         "bad-resource", "unknown-field"],
)  # fmt: skip
async def test_invalid_plans_are_rejected_and_write_nothing(
    api: httpx.AsyncClient,
    pool: Pool,
    uid: str,
    body: dict[str, Any],
    status: int,
    slug: str,
    text: str,
) -> None:
    if "name" in body:
        body = {**body, "name": f"bad-{uid}"}
    before = await f.fetch(pool, "SELECT count(*) FROM plans")
    problem = assert_problem(await api.post("/v1/plans", json=body), status, slug, text)
    if slug == "validation-error":
        assert problem["errors"] and all("field" in e for e in problem["errors"])
    assert await f.fetch(pool, "SELECT count(*) FROM plans") == before


async def test_plan_errors_conflict_not_found_and_malformed_json(
    api: httpx.AsyncClient, uid: str
) -> None:
    plan = await make_plan(api, uid)
    assert_problem(
        await api.post("/v1/plans", json={"name": plan["name"]}), 409, "conflict", "exists"
    )
    assert_problem(await api.get("/v1/plans/nope"), 404, "not-found", "unknown plan")
    assert_problem(await api.patch("/v1/plans/nope", json={"price_cents": 1}), 404, "not-found")
    assert_problem(await api.post("/v1/plans/nope/archive"), 404, "not-found")
    r = await api.post(
        "/v1/plans", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_problem(r, 400, "malformed-json")
    r = await api.post("/v1/plans", content=b"name=x", headers={"content-type": "text/plain"})
    assert_problem(r, 415, "unsupported-media-type")
    other = await make_plan(api, f"{uid}-2")
    r = await api.patch(f"/v1/plans/{other['plan_id']}", json={"name": plan["name"]})
    assert_problem(r, 409, "conflict")
    assert_problem(await api.get("/v1/nothing-here"), 404, "not-found")
    assert_problem(await api.delete("/v1/plans"), 405, "method-not-allowed")


async def test_lists_are_cursor_paginated(api: httpx.AsyncClient, uid: str) -> None:
    made = {(await make_tenant(api, f"page-{uid}-{i}"))["tenant_id"] for i in range(5)}
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (await api.get("/v1/tenants", params=params)).json()
        assert len(page["items"]) <= 2
        seen += [t["tenant_id"] for t in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert made <= set(seen) and len(seen) == len(set(seen)) and seen == sorted(seen)
    # a cursor the API never returned addresses no page
    assert_problem(
        await api.get("/v1/tenants", params={"cursor": "garbage!"}), 404, "not-found", "cursor"
    )
    assert_problem(await api.get("/v1/tenants", params={"limit": 0}), 422, "validation-error")
    active = (await api.get("/v1/plans", params={"active": "false", "limit": 500})).json()
    assert all(p["active"] is False for p in active["items"])


async def test_tenants_create_get_and_errors(api: httpx.AsyncClient, uid: str) -> None:
    t = await make_tenant(api, f"t-{uid}", email="ops@example.com", timezone="Europe/Berlin")
    assert t["timezone"] == "Europe/Berlin" and t["trial_used_at"] is None
    assert (await api.get(f"/v1/tenants/t-{uid}")).json() == t
    assert_problem(
        await api.post("/v1/tenants", json={"tenant_id": f"t-{uid}", "name": "again"}),
        409,
        "conflict",
    )
    assert_problem(
        await api.post(
            "/v1/tenants", json={"tenant_id": f"z-{uid}", "name": "Z", "timezone": "Mars/Base"}
        ),
        422,
        "invalid-request",
        "timezone",
    )
    assert_problem(await api.get(f"/v1/tenants/ghost-{uid}"), 404, "not-found", "unknown tenant")
