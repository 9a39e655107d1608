"""POST /v1/tenants/{id}/billing-links and the session it opens: signed, expiring, one
tenant only, audited; bad input refused with nothing written."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import httpx

from control_plane.ui.signing import Signer
from tests.conftest import LINK_SECRET, ControlPlane, running_control_plane


async def _tenant(api: httpx.AsyncClient, tenant_id: str, name: str) -> None:
    r = await api.post("/v1/tenants", json={"tenant_id": tenant_id, "name": name})
    assert r.status_code == 201, r.text


async def _link_audits(api: httpx.AsyncClient, tenant_id: str) -> list[dict[str, object]]:
    r = await api.get("/v1/audit-log", params={"entity_id": tenant_id})
    assert r.status_code == 200, r.text
    return [e for e in r.json()["items"] if e["action"] == "billing_link.create"]


async def test_a_link_opens_a_session_for_its_tenant_only(
    api: httpx.AsyncClient, control_plane: ControlPlane, uid: str
) -> None:
    tenant = f"link-{uid}"
    await _tenant(api, tenant, f"Link Co {uid}")
    before = datetime.now(UTC)
    r = await api.post(
        f"/v1/tenants/{tenant}/billing-links",
        json={"return_url": "https://app.example/settings", "expires_in_seconds": 600},
    )
    assert r.status_code == 201, r.text
    link = r.json()
    expires_at = datetime.fromisoformat(link["expires_at"])
    assert (
        before + timedelta(seconds=599) <= expires_at <= datetime.now(UTC) + timedelta(seconds=600)
    )
    assert link["url"].startswith(f"{control_plane.url}/billing/session?token=")
    assert len(await _link_audits(api, tenant)) == 1

    async with httpx.AsyncClient(base_url=control_plane.url) as browser:
        opened = await browser.get(link["url"])
        assert opened.status_code == 303 and opened.headers["location"] == "/billing"
        cookie = opened.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=lax" in cookie and "path=/billing" in cookie
        assert "secure" not in cookie  # served over http here
        overview = await browser.get("/billing")
    assert overview.status_code == 200
    assert f"Link Co {uid}" in overview.text
    assert 'href="https://app.example/settings"' in overview.text  # the way back to the app
    csp = overview.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert "frame-ancestors 'self'" in csp
    assert overview.headers["x-content-type-options"] == "nosniff"
    assert overview.headers["referrer-policy"] == "same-origin"
    assert overview.headers["cache-control"] == "no-store"
    assert float(overview.headers["server-timing"].removeprefix("app;dur=")) > 0


async def test_a_link_can_open_the_limit_page_of_a_denial(
    api: httpx.AsyncClient, control_plane: ControlPlane, uid: str
) -> None:
    """What the platform sends a user whose call was refused: the page that says why."""
    tenant = f"limit-{uid}"
    await _tenant(api, tenant, f"Limit Co {uid}")
    for opens, landing in (
        ("limits/messages", "/billing/limits/messages"),
        ("limits/custom:gpu.minutes", "/billing/limits/custom%3Agpu.minutes"),
        ("plans", "/billing/plans"),
    ):
        r = await api.post(f"/v1/tenants/{tenant}/billing-links", json={"opens": opens})
        assert r.status_code == 201, r.text
        async with httpx.AsyncClient(base_url=control_plane.url) as browser:
            opened = await browser.get(r.json()["url"])
            assert opened.status_code == 303 and opened.headers["location"] == landing
            page = await browser.get(landing)
        assert page.status_code == 200, page.text
    page_text = page.text
    assert f"Limit Co {uid}" in page_text
    for wrong in ("limits/", "limits/gold", "admin", "/billing", "limits/messages/../../admin"):
        r = await api.post(f"/v1/tenants/{tenant}/billing-links", json={"opens": wrong})
        assert r.status_code == 422, (wrong, r.text)


async def test_tampered_expired_and_foreign_tokens_open_nothing(
    api: httpx.AsyncClient, control_plane: ControlPlane, uid: str
) -> None:
    tenant = f"tamper-{uid}"
    await _tenant(api, tenant, f"Secret Co {uid}")
    r = await api.post(f"/v1/tenants/{tenant}/billing-links", json={})
    token = parse_qs(urlsplit(r.json()["url"]).query)["token"][0]
    body, mac = token.split(".")
    signer = Signer(LINK_SECRET)
    now = datetime.now(UTC)
    forged = [
        f"{body}x.{mac}",  # the payload changed
        f"{body}.{mac[:-2]}AA",  # the signature changed
        signer.sign("billing-link", {"t": tenant}, now - timedelta(seconds=1)),  # expired
        signer.sign("billing-session", {"t": tenant}, now + timedelta(hours=1)),  # wrong use
        Signer("another-secret-" + "y" * 24).sign(
            "billing-link", {"t": tenant}, now + timedelta(hours=1)
        ),
        "",
    ]
    async with httpx.AsyncClient(base_url=control_plane.url) as browser:
        for bad in forged:
            opened = await browser.get("/billing/session", params={"token": bad})
            assert opened.status_code == 401, bad
            assert "set-cookie" not in opened.headers
            assert "This link has expired" in opened.text and "Secret Co" not in opened.text
        browser.cookies.set("bp_billing", token, path="/billing")  # a link is no session
        assert (await browser.get("/billing")).status_code == 401


async def test_bad_requests_are_refused_and_write_nothing(api: httpx.AsyncClient, uid: str) -> None:
    tenant = f"badlink-{uid}"
    await _tenant(api, tenant, "Bad Link Co")
    for body in (
        {"return_url": "javascript:alert(1)"},
        {"return_url": "/relative"},
        {"expires_in_seconds": 10},
        {"expires_in_seconds": 86_401},
        {"expires_in_seconds": "900"},
        {"tenant": "someone-else"},
    ):
        r = await api.post(f"/v1/tenants/{tenant}/billing-links", json=body)
        assert r.status_code == 422, (body, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
    missing = await api.post(f"/v1/tenants/nobody-{uid}/billing-links", json={})
    assert missing.status_code == 404
    assert await _link_audits(api, tenant) == []
    async with httpx.AsyncClient(base_url=str(api.base_url)) as anonymous:
        assert (
            await anonymous.post(f"/v1/tenants/{tenant}/billing-links", json={})
        ).status_code == 401


async def test_without_a_secret_there_are_no_links(database_url: str, uid: str) -> None:
    async with running_control_plane(database_url, billing_link_secret="") as bare:
        headers = {"Authorization": f"Bearer {bare.key}"}
        async with httpx.AsyncClient(base_url=bare.url, headers=headers) as api:
            await _tenant(api, f"nosecret-{uid}", "No Secret Co")
            r = await api.post(f"/v1/tenants/nosecret-{uid}/billing-links", json={})
            assert r.status_code == 503 and "BILLING_LINK_SECRET" in r.text
            assert await _link_audits(api, f"nosecret-{uid}") == []
            page = await api.get("/admin/login")
            assert page.status_code == 503 and "BILLING_LINK_SECRET" in page.text
