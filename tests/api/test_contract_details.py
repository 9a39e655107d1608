"""Details of the HTTP contract that schemathesis found: a 405 names the allowed methods, a
number with no fraction is an integer, a key cannot revoke itself, an unknown cursor
addresses no page."""

from __future__ import annotations

import httpx

from tests.api.conftest import assert_problem, make_tenant
from tests.conftest import ControlPlane


async def test_a_method_not_allowed_names_the_allowed_ones(api: httpx.AsyncClient) -> None:
    r = await api.request("DELETE", "/v1/plans")
    assert_problem(r, 405, "method-not-allowed")
    assert {"GET", "POST"} <= {m.strip() for m in r.headers["allow"].split(",")}
    r = await api.request("TRACE", "/v1/tenants/anyone/subscription")
    assert r.status_code == 405
    assert {"GET", "PUT"} <= {m.strip() for m in r.headers["allow"].split(",")}


async def test_a_whole_number_written_with_a_fraction_is_an_integer(
    api: httpx.AsyncClient, uid: str
) -> None:
    tenant = f"whole-{uid}"
    await make_tenant(api, tenant)
    grants = f"/v1/tenants/{tenant}/wallet/grants"
    r = await api.post(grants, json={"amount_micros": 5.0, "reason": "whole"})
    assert r.status_code == 201, r.text
    assert r.json()["amount_micros"] == 5
    for bad in (5.5, "5", True):
        r = await api.post(grants, json={"amount_micros": bad, "reason": "not whole"})
        assert_problem(r, 422, "validation-error")
    wallet = (await api.get(f"/v1/tenants/{tenant}/wallet")).json()
    assert wallet["balance_micros"] == 5


async def test_a_key_cannot_revoke_itself(control_plane: ControlPlane, uid: str) -> None:
    async with httpx.AsyncClient(
        base_url=control_plane.url, headers={"Authorization": f"Bearer {control_plane.key}"}
    ) as admin:
        issued = (await admin.post("/v1/api-keys", json={"name": f"self-{uid}"})).json()
        async with httpx.AsyncClient(
            base_url=control_plane.url, headers={"Authorization": f"Bearer {issued['key']}"}
        ) as itself:
            r = await itself.post(f"/v1/api-keys/{issued['api_key_id']}/revoke")
            assert_problem(r, 409, "conflict", "cannot revoke itself")
            assert (await itself.get("/v1/plans")).status_code == 200  # still works
        r = await admin.post(f"/v1/api-keys/{issued['api_key_id']}/revoke")
        assert r.status_code == 200 and r.json()["revoked_at"]
