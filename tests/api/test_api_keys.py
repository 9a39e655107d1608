"""API keys: listed without their secrets, scoped (a read key reads, nothing more),
revoked at once (with the admin sessions opened by them), and an address that keeps
failing to authenticate is answered 429 for a while."""

from __future__ import annotations

import re

import httpx

from control_plane.api.auth import FailedAuthentications
from tests.conftest import ControlPlane, running_control_plane


def _client(url: str, key: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"})


async def test_a_read_key_reads_and_changes_nothing(
    api: httpx.AsyncClient, control_plane: ControlPlane, uid: str
) -> None:
    r = await api.post("/v1/api-keys", json={"name": f"dash-{uid}", "scope": "read"})
    assert r.status_code == 201, r.text
    issued = r.json()
    assert issued["scope"] == "read" and issued["key"].startswith(issued["prefix"])
    async with _client(control_plane.url, issued["key"]) as reader:
        assert (await reader.get("/v1/plans")).status_code == 200
        for method, path, body in (
            ("POST", "/v1/plans", {"name": f"sneaky-{uid}"}),
            ("POST", "/v1/tenants", {"tenant_id": f"sneaky-{uid}", "name": "x"}),
            ("POST", "/v1/api-keys", {"name": "escalate"}),
            ("GET", "/v1/api-keys", None),
        ):
            r = await reader.request(method, path, json=body)
            assert r.status_code == 403, (method, path, r.text)
            assert r.json()["type"] == "/problems/forbidden"
    assert (await api.get(f"/v1/tenants/sneaky-{uid}")).status_code == 404
    plans = (await api.get("/v1/plans", params={"limit": 500})).json()["items"]
    assert all(p["name"] != f"sneaky-{uid}" for p in plans)


async def test_keys_are_listed_without_secrets_and_revoked_at_once(
    api: httpx.AsyncClient, control_plane: ControlPlane, uid: str
) -> None:
    issued = (await api.post("/v1/api-keys", json={"name": f"ops-{uid}"})).json()
    listed = []
    cursor = None
    while True:
        page = (await api.get("/v1/api-keys", params={"limit": 2, "cursor": cursor})).json()
        listed += page["items"]
        if not (cursor := page["next_cursor"]):
            break
    [mine] = [k for k in listed if k["api_key_id"] == issued["api_key_id"]]
    assert mine == {k: v for k, v in issued.items() if k != "key"}
    assert all("key" not in k and "key_hash" not in k for k in listed)

    async with _client(control_plane.url, issued["key"]) as ops:
        assert (await ops.get("/v1/plans")).status_code == 200
        r = await api.post(f"/v1/api-keys/{issued['api_key_id']}/revoke")
        assert r.status_code == 200 and r.json()["revoked_at"] is not None
        assert (await ops.get("/v1/plans")).status_code == 401  # at once
    again = await api.post(f"/v1/api-keys/{issued['api_key_id']}/revoke")
    assert again.json()["revoked_at"] == r.json()["revoked_at"]  # revoking twice: no change
    assert (await api.post("/v1/api-keys/key_nope/revoke")).status_code == 404
    audit = (await api.get("/v1/audit-log", params={"entity_id": issued["api_key_id"]})).json()
    assert [e["action"] for e in audit["items"]] == ["api_key.revoke", "api_key.create"]
    assert (await api.post("/v1/api-keys", json={"name": "x", "scope": "root"})).status_code == 422


async def test_an_admin_session_ends_when_its_key_is_revoked(
    api: httpx.AsyncClient, control_plane: ControlPlane, uid: str
) -> None:
    issued = (await api.post("/v1/api-keys", json={"name": f"operator-{uid}"})).json()
    reader = (await api.post("/v1/api-keys", json={"name": f"r-{uid}", "scope": "read"})).json()
    async with httpx.AsyncClient(base_url=control_plane.url) as browser:
        for key, signed_in in ((reader["key"], False), (issued["key"], True)):
            login = await browser.get("/admin/login")
            token = re.search(r'name="csrf" value="([^"]+)"', login.text)
            assert token is not None
            r = await browser.post(
                "/admin/login", data={"csrf": token.group(1), "api_key": key, "next": ""}
            )
            assert (r.status_code == 303) is signed_in, r.text
        assert "may only read" not in r.text
        assert (await browser.get("/admin/plans")).status_code == 200
        await api.post(f"/v1/api-keys/{issued['api_key_id']}/revoke")
        r = await browser.get("/admin/plans")
        assert r.status_code == 303 and r.headers["location"].startswith("/admin/login")


async def test_an_address_that_keeps_failing_is_answered_429(database_url: str) -> None:
    async with (
        running_control_plane(database_url, auth_failures_per_minute=3) as cp,
        _client(cp.url, "bpk_wrong") as guesser,
        _client(cp.url, cp.key) as owner,
    ):
        statuses = [(await guesser.get("/v1/plans")).status_code for _ in range(4)]
        assert statuses == [401, 401, 401, 429]
        refused = await owner.get("/v1/plans")  # a right key from there waits too
        assert refused.status_code == 429
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        assert refused.json()["type"] == "/problems/too-many-requests"
        login = await guesser.post("/admin/login", data={"api_key": cp.key})
        assert login.status_code == 429  # the admin sign-in counts the same failures


def test_failures_slide_out_of_the_minute() -> None:
    now = [1000.0]
    failures = FailedAuthentications(2, clock=lambda: now[0], max_addresses=2)
    failures.failed("a")
    now[0] += 30
    failures.failed("a")
    assert failures.retry_after("a") == 30  # until the first failure is a minute old
    now[0] += 30
    assert failures.retry_after("a") == 0
    failures.failed("b")
    failures.failed("c")  # a third address: the longest known one is forgotten
    assert set(failures._failures) == {"b", "c"}
    assert FailedAuthentications(0).retry_after("x") == 0
