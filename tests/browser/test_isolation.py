"""Nothing of a tenant without its link; one tenant's session never shows another's data;
a form posted without its token is refused and changes nothing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

from playwright.sync_api import Browser, Page, expect

from control_plane.ui.signing import Signer
from tests.browser.conftest import Live, assert_accessible, new_context
from tests.conftest import LINK_SECRET


def test_no_link_an_expired_link_or_a_tampered_link_shows_nothing(
    live: Live, page: Page, uid: str
) -> None:
    tenant = f"secret-{uid}"
    live.tenant(tenant, f"Secret Corp {uid}")
    for path in ("/billing", "/billing/plans", "/billing/limits/messages", "/billing/status"):
        response = page.goto(f"{live.url}{path}")
        assert response is not None and response.status == 401, path
        expect(page.get_by_role("heading", name="This link has expired")).to_be_visible()
    assert_accessible(page)

    token = parse_qs(urlsplit(live.billing_link(tenant)).query)["token"][0]
    body, mac = token.split(".")
    expired = Signer(LINK_SECRET).sign(
        "billing-link", {"t": tenant}, datetime.now(UTC) - timedelta(seconds=5)
    )
    for bad in (expired, f"{body[:-2]}xx.{mac}", f"{body}.{mac[::-1]}"):
        page.goto(f"{live.url}/billing/session?token={bad}")
        expect(page.get_by_role("heading", name="This link has expired")).to_be_visible()
        expect(page.get_by_text("Secret Corp")).to_have_count(0)
        assert page.context.cookies() == []


def test_one_tenants_session_never_shows_another_tenants_pages(
    live: Live, browser: Browser, uid: str
) -> None:
    live.tenant(f"alpha-{uid}", "Alpha Studio")
    live.tenant(f"beta-{uid}", "Beta Works")
    live.ok("PUT", f"/v1/tenants/beta-{uid}/subscription", json={"plan_id": "enterprise"})
    alpha = new_context(browser).new_page()
    try:
        alpha.goto(live.billing_link(f"alpha-{uid}"))
        expect(alpha.get_by_text("Billing · Alpha Studio")).to_be_visible()
        # every way of naming the other tenant in the address is ignored
        for path in (
            f"/billing?tenant=beta-{uid}",
            f"/billing/plans?tenant_id=beta-{uid}",
            f"/billing/limits/messages?tenant=beta-{uid}",
            f"/billing/return?tenant=beta-{uid}&session_id=cs_x",
        ):
            alpha.goto(f"{live.url}{path}")
            expect(alpha.get_by_text("Beta Works")).to_have_count(0)
            if "return" not in path:
                expect(alpha.get_by_role("alert")).to_contain_text("You have no plan yet")
        status = alpha.request.get(f"{live.url}/billing/status?tenant=beta-{uid}").json()
        assert status["status"] == "none" and status["plan_id"] is None  # alpha's, not beta's
        # beta's link opened in alpha's browser replaces the session: one tenant at a time
        alpha.goto(live.billing_link(f"beta-{uid}"))
        expect(alpha.get_by_text("Billing · Beta Works")).to_be_visible()
        assert len([c for c in alpha.context.cookies() if c["name"] == "bp_billing"]) == 1
        cookie = next(c for c in alpha.context.cookies() if c["name"] == "bp_billing")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Lax" and cookie["path"] == "/billing"
    finally:
        alpha.context.close()


def test_a_form_without_its_token_is_refused_and_changes_nothing(
    live: Live, page: Page, uid: str
) -> None:
    tenant = f"forged-{uid}"
    live.tenant(tenant, "Forged Forms Ltd")
    page.goto(live.billing_link(tenant))
    before = live.ok("GET", f"/v1/tenants/{tenant}/subscription")
    for token in (None, "", "forged.token", _other_sessions_token(live, page)):
        form: dict[str, str | float | bool] = {} if token is None else {"csrf": token}
        response = page.request.post(f"{live.url}/billing/plans/free/choose", form=form)
        assert response.status == 403, token
        assert "Nothing was changed" in response.text()
    assert live.ok("GET", f"/v1/tenants/{tenant}/subscription") == before

    # the admin pages the same way: a plan form posted without a token creates nothing
    page.goto(f"{live.url}/admin/login")
    page.get_by_label("Admin API key").fill(live.stack.key)
    page.get_by_role("button", name="Sign in").click()
    response = page.request.post(
        f"{live.url}/admin/plans/new", form={"name": f"Forged {uid}", "price": "0"}
    )
    assert response.status == 403
    names = [p["name"] for p in live.ok("GET", "/v1/plans", params={"limit": 500})["items"]]
    assert f"Forged {uid}" not in names

    # with its token the same form works (the refusal above was the token's doing)
    page.goto(f"{live.url}/billing/plans")
    page.get_by_role("button", name="Choose Free").click()
    expect(page.get_by_role("status")).to_have_text("You are on the new plan now.")
    assert live.ok("GET", f"/v1/tenants/{tenant}/subscription")["plan_id"] == "free"
    assert_accessible(page)


def _other_sessions_token(live: Live, page: Page) -> str:
    """A real form token, but another session's (a token leaks nothing across sessions)."""
    other = page.context.browser.new_context()  # type: ignore[union-attr]
    try:
        stranger = other.new_page()
        stranger.goto(live.billing_link("acme"))
        stranger.goto(f"{live.url}/billing/plans")
        value = stranger.locator("input[name=csrf]").first.get_attribute("value")
        assert value
        return value
    finally:
        other.close()
