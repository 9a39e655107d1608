"""Subscriptions, trials, overrides, wallet and prices over HTTP."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from psycopg_pool import AsyncConnectionPool

from tests import factories as f
from tests.api.conftest import assert_problem, make_plan, make_tenant

Pool = AsyncConnectionPool[Any]


async def test_subscription_explained_assigned_and_idempotent(
    api: httpx.AsyncClient, pool: Pool, uid: str
) -> None:
    t = (await make_tenant(api, f"t-{uid}"))["tenant_id"]
    none = (await api.get(f"/v1/tenants/{t}/subscription")).json()
    assert none["status"] == "none" and "choose a plan" in none["explanation"]
    free = await make_plan(
        api, f"free-{uid}", wallet_grants=[{"on": "start", "amount_micros": 1_000_000}]
    )
    paid = await make_plan(api, f"paid-{uid}", price_cents=1000)
    ent = await make_plan(api, f"ent-{uid}", price_cents=90_000, enterprise=True)
    sub = await api.put(f"/v1/tenants/{t}/subscription", json={"plan_id": free["plan_id"]})
    assert sub.status_code == 200, sub.text
    assert sub.json()["status"] == "active" and sub.json()["plan_name"] == free["name"]
    assert sub.json()["explanation"] == f"You are on {free['name']}."
    again = await api.put(f"/v1/tenants/{t}/subscription", json={"plan_id": free["plan_id"]})
    assert again.json() == sub.json()  # a retried PUT changes nothing …
    wallet = (await api.get(f"/v1/tenants/{t}/wallet")).json()
    assert wallet["balance_micros"] == 1_000_000  # … and grants nothing twice
    assert_problem(
        await api.put(f"/v1/tenants/{t}/subscription", json={"plan_id": paid["plan_id"]}),
        409,
        "conflict",
        "checkout",
    )
    r = await api.put(f"/v1/tenants/{t}/subscription", json={"plan_id": ent["plan_id"]})
    assert r.json()["plan_id"] == ent["plan_id"]
    current = await f.fetch(
        pool, "SELECT count(*) FROM subscriptions WHERE tenant_id = %s AND is_current", t
    )
    assert current == [(1,)]
    await api.post(f"/v1/plans/{free['plan_id']}/archive")
    assert_problem(
        await api.put(f"/v1/tenants/{t}/subscription", json={"plan_id": free["plan_id"]}),
        409,
        "conflict",
        "archived",
    )
    assert_problem(
        await api.put(f"/v1/tenants/{t}/subscription", json={"plan_id": "nope"}), 404, "not-found"
    )
    assert_problem(
        await api.put(f"/v1/tenants/ghost-{uid}/subscription", json={"plan_id": ent["plan_id"]}),
        404,
        "not-found",
    )


async def test_one_trial_per_tenant_ever(api: httpx.AsyncClient, uid: str) -> None:
    t = (await make_tenant(api, f"t-{uid}"))["tenant_id"]
    pro = await make_plan(api, f"pro-{uid}", price_cents=2000, trial=True, trial_days=14)
    no_trial = await make_plan(api, f"plain-{uid}", price_cents=2000)
    assert_problem(
        await api.post(f"/v1/tenants/{t}/trial", json={"plan_id": no_trial["plan_id"]}),
        409,
        "conflict",
        "no trial",
    )
    r = await api.post(f"/v1/tenants/{t}/trial", json={"plan_id": pro["plan_id"]})
    assert r.status_code == 201, r.text
    sub = r.json()
    assert sub["status"] == "trialing"
    trial_end = datetime.fromisoformat(sub["trial_end"])
    assert timedelta(days=13, hours=23) < trial_end - datetime.now(UTC) <= timedelta(days=14)
    assert "free trial" in sub["explanation"]
    assert_problem(
        await api.post(f"/v1/tenants/{t}/trial", json={"plan_id": pro["plan_id"]}),
        409,
        "conflict",
        "already had a trial",
    )
    tenant = (await api.get(f"/v1/tenants/{t}")).json()
    assert tenant["trial_used_at"] is not None


async def test_overrides_only_for_enterprise_and_they_change_the_limits(
    api: httpx.AsyncClient, uid: str
) -> None:
    t = (await make_tenant(api, f"t-{uid}"))["tenant_id"]
    free = await make_plan(api, f"free-{uid}")
    ent = await make_plan(api, f"ent-{uid}", price_cents=50_000, enterprise=True)
    custom = {"quotas": [{"resource": "messages", "period": "daily", "limit": 777}]}
    await api.put(f"/v1/tenants/{t}/subscription", json={"plan_id": free["plan_id"]})
    assert_problem(
        await api.put(f"/v1/tenants/{t}/overrides", json=custom), 409, "conflict", "enterprise"
    )
    await api.put(f"/v1/tenants/{t}/subscription", json={"plan_id": ent["plan_id"]})
    r = await api.put(f"/v1/tenants/{t}/overrides", json=custom)
    assert r.status_code == 200 and r.json()["quotas"][0]["limit"] == 777
    assert (await api.get(f"/v1/tenants/{t}/overrides")).json() == r.json()
    usage = (await api.get(f"/v1/tenants/{t}/usage")).json()
    [messages] = [x for x in usage["resources"] if x["resource"] == "messages"]
    assert messages["windows"][0]["limit"] == 777
    assert_problem(
        await api.put(
            f"/v1/tenants/{t}/overrides",
            json={"quotas": custom["quotas"] * 2},
        ),
        422,
        "invalid-request",
        "duplicate",
    )
    assert_problem(await api.get(f"/v1/tenants/ghost-{uid}/overrides"), 404, "not-found")


async def test_manual_grants_replay_by_idempotency_key(
    api: httpx.AsyncClient, pool: Pool, uid: str
) -> None:
    t = (await make_tenant(api, f"t-{uid}"))["tenant_id"]
    body = {"amount_micros": 2_500_000, "reason": "goodwill for the outage"}
    key = {"Idempotency-Key": f"grant-{uid}"}
    first, second = await asyncio.gather(
        api.post(f"/v1/tenants/{t}/wallet/grants", json=body, headers=key),
        api.post(f"/v1/tenants/{t}/wallet/grants", json=body, headers=key),
    )
    assert first.status_code == second.status_code == 201
    assert first.json() == second.json()
    assert {
        first.headers.get("idempotent-replayed"),
        second.headers.get("idempotent-replayed"),
    } == {
        None,
        "true",
    }
    assert_problem(
        await api.post(
            f"/v1/tenants/{t}/wallet/grants", json={**body, "amount_micros": 1}, headers=key
        ),
        422,
        "invalid-request",
        "Idempotency-Key",
    )
    soon = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    r = await api.post(
        f"/v1/tenants/{t}/wallet/grants",
        json={"amount_micros": 500_000, "reason": "promo", "expires_at": soon},
    )
    assert r.status_code == 201 and r.json()["expires_at"] is not None
    wallet = (await api.get(f"/v1/tenants/{t}/wallet")).json()
    assert wallet["balance_micros"] == wallet["available_micros"] == 3_000_000
    assert [g["reason"] for g in wallet["grants"]] == ["goodwill for the outage", "promo"]
    assert [e["delta_micros"] for e in wallet["ledger"]["items"]] == [500_000, 2_500_000]
    audit = await f.fetch(
        pool, "SELECT count(*) FROM audit_log WHERE action = 'wallet.grant' AND entity_id = %s", t
    )
    assert audit == [(2,)]
    past = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    for bad, slug in [
        ({"amount_micros": 0, "reason": "x"}, "validation-error"),
        ({"amount_micros": 5, "reason": "   "}, "validation-error"),
        ({"amount_micros": 5}, "validation-error"),
        ({"amount_micros": 5, "reason": "x", "expires_at": past}, "invalid-request"),
    ]:
        assert_problem(await api.post(f"/v1/tenants/{t}/wallet/grants", json=bad), 422, slug)
    assert_problem(
        await api.post(f"/v1/tenants/ghost-{uid}/wallet/grants", json=body), 404, "not-found"
    )
    assert_problem(await api.get(f"/v1/tenants/ghost-{uid}/wallet"), 404, "not-found")


async def test_model_prices_keep_history(api: httpx.AsyncClient, uid: str) -> None:
    model = f"m-{uid}"
    jan = {"input_micros_per_million": 2_500_000, "output_micros_per_million": 10_000_000}
    r = await api.put(
        f"/v1/model-prices/openai/{model}",
        json={**jan, "effective_from": "2026-01-01T00:00:00Z"},
    )
    assert r.status_code == 200, r.text
    r = await api.put(
        f"/v1/model-prices/openai/{model}",
        json={"input_micros_per_million": 2_000_000, "output_micros_per_million": 8_000_000},
    )
    assert r.status_code == 200
    page = (await api.get("/v1/model-prices", params={"model": model})).json()
    assert [p["input_micros_per_million"] for p in page["items"]] == [2_000_000, 2_500_000]
    assert_problem(
        await api.put(
            f"/v1/model-prices/openai/{model}",
            json={"input_micros_per_million": -1, "output_micros_per_million": 0},
        ),
        422,
        "validation-error",
    )
    assert_problem(
        await api.put(
            f"/v1/model-prices/openai/{model}",
            json={**jan, "effective_from": "2026-01-01T00:00:00"},  # no offset
        ),
        422,
        "validation-error",
    )
