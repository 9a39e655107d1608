"""Every HTML page escapes what it shows: a plan and a tenant named with markup are shown as
text on the local Stripe's checkout, portal and invoice pages and on the billing pages."""

from __future__ import annotations

import re

import httpx

from tests.billing.conftest import Stack, pay

HOSTILE = "<script>alert('x')</script> & \"Co\" <img src=x onerror=alert(1)>"


def assert_escaped(html: str, where: str) -> None:
    assert "<script>alert" not in html and "<img src=x" not in html, where
    assert "&lt;script&gt;" in html, where


async def test_markup_in_names_is_shown_as_text_on_every_page(stack: Stack, uid: str) -> None:
    tenant = f"esc-{uid}"
    async with stack.api() as api, httpx.AsyncClient(timeout=20, follow_redirects=True) as browser:
        plan = await api.post(
            "/v1/plans", json={"name": f"{HOSTILE} {uid}", "price_cents": 1500, "quotas": []}
        )
        assert plan.status_code == 201, plan.text
        r = await api.post("/v1/tenants", json={"tenant_id": tenant, "name": HOSTILE})
        assert r.status_code == 201, r.text
        checkout = await api.post(
            f"/v1/tenants/{tenant}/checkout-sessions", json={"plan_id": plan.json()["plan_id"]}
        )
        assert checkout.status_code == 201, checkout.text
        assert_escaped((await browser.get(checkout.json()["url"])).text, "checkout")
        assert (await pay(checkout.json()["url"])).status_code == 303
        await stack.settle()
        portal = await api.post(f"/v1/tenants/{tenant}/portal-sessions", json={})
        portal_page = (await browser.get(portal.json()["url"])).text
        assert_escaped(portal_page, "portal")
        invoice = re.search(r"/invoices/(in_\w+)", portal_page)
        if invoice:
            text = (await browser.get(f"{stack.emulator_url}/invoices/{invoice[1]}")).text
            assert "<script>" not in text
        link = await api.post(f"/v1/tenants/{tenant}/billing-links", json={})
        assert link.status_code == 201, link.text
        assert (await browser.get(link.json()["url"])).status_code == 200  # the session
        for path in ("/billing", "/billing/plans", "/billing/limits/messages"):
            page = await browser.get(f"{stack.url}{path}")
            assert page.headers["content-type"].startswith("text/html"), path
            assert_escaped(page.text, path)
        status = await browser.get(f"{stack.url}/billing/status")  # JSON for the page's script
        assert status.headers["content-type"].startswith("application/json")
