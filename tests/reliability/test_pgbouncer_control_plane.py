"""The control plane through PgBouncer in transaction mode (DB_PREPARED_STATEMENTS=off):
plans, tenants, subscriptions, grants and reads, each repeated past the count at which
psycopg would prepare a statement of its own."""

from __future__ import annotations

import httpx

from bench.pooler import pgbouncer
from tests.conftest import fresh_database, running_control_plane


async def test_the_control_plane_works_through_pgbouncer(server_url: str, uid: str) -> None:
    with fresh_database(server_url, "bp_bouncer") as url, pgbouncer(url) as through:
        async with running_control_plane(through, db_prepared_statements=False) as cp:
            headers = {"Authorization": f"Bearer {cp.key}"}
            async with httpx.AsyncClient(base_url=cp.url, headers=headers, timeout=20) as api:
                plan = await api.post(
                    "/v1/plans",
                    json={"name": f"b-{uid}", "quotas": [
                        {"resource": "messages", "period": "daily", "limit": 5}]},
                )  # fmt: skip
                assert plan.status_code == 201, plan.text
                for n in range(8):  # psycopg would prepare from the 5th time on
                    t = f"bouncer-{uid}-{n}"
                    r = await api.post("/v1/tenants", json={"tenant_id": t, "name": t})
                    assert r.status_code == 201, r.text
                    r = await api.put(
                        f"/v1/tenants/{t}/subscription", json={"plan_id": plan.json()["plan_id"]}
                    )
                    assert r.status_code == 200, r.text
                    r = await api.post(
                        f"/v1/tenants/{t}/wallet/grants", json={"amount_micros": 10, "reason": "b"}
                    )
                    assert r.status_code == 201, r.text
                    for path in ("usage", "wallet", "subscription", "usage-records"):
                        r = await api.get(f"/v1/tenants/{t}/{path}")
                        assert r.status_code == 200, (path, r.text)
                listed = (await api.get("/v1/tenants", params={"limit": 500})).json()
                assert (
                    sum(t["tenant_id"].startswith(f"bouncer-{uid}") for t in listed["items"]) == 8
                )
