"""`make screenshots`: the main pages with demo data, rendered by Chromium into
docs/screenshots/. Run explicitly (`pytest tests/browser/screenshots.py`); the suite does
not collect it."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from playwright.sync_api import Page, expect
from quota_client import Tokens

from tests.browser.conftest import Live, assert_accessible

OUT = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
# tokens and messages per day over the last three weeks (a working week's rhythm)
TOKENS = [42, 58, 61, 55, 70, 12, 8, 66, 81, 77, 90, 84, 15, 9, 95, 102, 88, 120, 110, 20, 14]
MESSAGES = [12, 18, 20, 17, 25, 3, 2, 22, 30, 27, 31, 29, 5, 4, 33, 35, 30, 41, 38, 6, 5]


def _history(live: Live, tenant: str) -> None:
    """Three weeks of usage through the sidecar, each day on its own date."""
    with live.quota() as quota:
        for back, (tokens, messages) in enumerate(zip(TOKENS, MESSAGES, strict=True)):
            live.clock.offset = -timedelta(days=len(TOKENS) - back)
            for n in range(3):
                used = tokens * 1000 // 3
                quota.check_and_consume(
                    tenant,
                    "tokens",
                    used,
                    request_id=f"t{back}-{n}",
                    tokens=Tokens("openai", "gpt-4o-mini", used * 3 // 4, used // 4),
                )
            quota.check_and_consume(tenant, "messages", messages, request_id=f"m{back}")
        live.clock.offset = timedelta()
        quota.check_and_consume(tenant, "agents", 3, request_id="agents")
        quota.check_and_consume(tenant, "messages", 870, request_id="busy-today")


def test_render_the_main_pages(live: Live, page: Page) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    _history(live, "acme")
    live.ok(
        "POST",
        "/v1/tenants/acme/wallet/grants",
        json={
            "amount_micros": 10_000_000,
            "reason": "welcome credit",
            "expires_at": (live.clock.now() + timedelta(days=60)).isoformat(),
        },
    )
    page.set_viewport_size({"width": 1100, "height": 900})
    page.goto(live.billing_link("acme"))
    expect(page.get_by_role("heading", name="Your plan")).to_be_visible()
    assert_accessible(page)
    page.screenshot(path=OUT / "overview.png", full_page=True)

    page.goto(f"{live.url}/billing/plans")
    assert_accessible(page)
    page.screenshot(path=OUT / "plans.png", full_page=True)

    with live.quota() as quota:
        quota.check_and_consume("globex", "messages", 50, request_id="globex-busy")
    page.goto(live.billing_link("globex"))
    page.goto(f"{live.url}/billing/limits/messages")
    expect(page.get_by_role("heading", name="Messages limit reached")).to_be_visible()
    assert_accessible(page)
    page.screenshot(path=OUT / "limit.png", full_page=True)

    page.set_viewport_size({"width": 390, "height": 844})
    page.goto(live.billing_link("acme"))
    page.screenshot(path=OUT / "overview-phone.png")

    page.set_viewport_size({"width": 1100, "height": 900})
    page.goto(f"{live.url}/admin/login")
    page.get_by_label("Admin API key").fill(live.stack.key)
    page.get_by_role("button", name="Sign in").click()
    page.goto(f"{live.url}/admin/tenants/acme")
    assert_accessible(page)
    page.screenshot(path=OUT / "admin-tenant.png", full_page=True)
