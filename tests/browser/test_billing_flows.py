"""A workspace owner on the billing pages, in Chromium: checkout and its return, the portal,
an upgrade with its preview, an expired trial, a reached limit, a failed renewal. Every
state reached is checked with axe."""

from __future__ import annotations

import re
import time
from datetime import datetime, timedelta
from typing import Any

import httpx
from playwright.sync_api import Page, expect
from quota_client import pb

from control_plane.ui.formatting import Formats
from tests.billing.conftest import stripe_sdk
from tests.browser.conftest import Live, assert_accessible

DAY = 86_400


def open_billing(page: Page, live: Live, tenant: str) -> None:
    page.goto(live.billing_link(tenant))
    expect(page).to_have_url(f"{live.url}/billing")


def subscription(live: Live, tenant: str) -> dict[str, Any]:
    result: dict[str, Any] = live.ok("GET", f"/v1/tenants/{tenant}/subscription")
    return result


def pay_by_api(live: Live, tenant: str, plan_id: str, card: str = "4242424242424242") -> None:
    """The tenant already pays (set up without the pages)."""
    link = live.ok("POST", f"/v1/tenants/{tenant}/checkout-sessions", json={"plan_id": plan_id})
    with httpx.Client(timeout=20) as http:
        r = http.post(link["url"], data={"card": card})
        assert r.status_code == 303, r.text
    live.settle()
    assert subscription(live, tenant)["status"] == "active"


def wait_for(check: Any, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_checkout_returns_to_a_page_that_activates_without_a_reload(
    live: Live, page: Page, uid: str
) -> None:
    tenant = f"buyer-{uid}"
    live.tenant(tenant, "Buyer Ltd")
    open_billing(page, live, tenant)
    expect(page.get_by_role("alert")).to_contain_text("You have no plan yet")
    assert_accessible(page)
    page.get_by_role("link", name="Change plan").click()
    expect(page.get_by_role("heading", name="Plans", exact=True)).to_be_visible()
    assert_accessible(page)

    # a declined card: the checkout page says why, nothing changes here
    page.get_by_role("button", name="Choose Pro").click()
    page.get_by_label("Card number").fill("4000 0000 0000 0002")
    page.get_by_role("button", name="Pay").click()
    expect(page.get_by_role("alert")).to_have_text("Your card was declined.")
    live.settle()
    assert subscription(live, tenant)["status"] == "none"

    # a good card, with the webhooks held back: the page waits, then activates in place
    live.run(live.stack.webhooks(paused=True))
    try:
        page.get_by_label("Card number").fill("4242 4242 4242 4242")
        page.get_by_role("button", name="Pay").click()
        expect(page).to_have_url(re.compile(r"/billing/return\?session_id=cs_"))
        expect(page.get_by_role("heading")).to_have_text("Payment received — activating your plan")
        assert_accessible(page)
        page.evaluate("() => { window.stillTheSamePage = true; }")
        page.wait_for_timeout(1500)  # polled at least once: nothing is active before the webhook
        assert subscription(live, tenant)["status"] == "none"
        expect(page.get_by_text("Your plan is active")).to_be_hidden()
    finally:
        live.run(live.stack.webhooks(paused=False))
    expect(page.get_by_role("heading")).to_have_text("Your plan is active", timeout=20_000)
    expect(page.locator("#active-headline")).to_have_text("Pro trial — 14 days left")
    assert page.evaluate("() => window.stillTheSamePage") is True  # no reload
    assert_accessible(page)
    assert subscription(live, tenant)["status"] == "trialing"


def test_a_cancelled_checkout_comes_back_calmly(live: Live, page: Page, uid: str) -> None:
    tenant = f"ditherer-{uid}"
    live.tenant(tenant, "Ditherer Ltd")
    open_billing(page, live, tenant)
    page.goto(f"{live.url}/billing/plans")
    page.get_by_role("button", name="Choose Team").click()
    page.get_by_role("link", name="Cancel").click()
    expect(page).to_have_url(re.compile(r"/billing/plans\?checkout=canceled"))
    expect(page.get_by_role("status")).to_have_text(
        "Checkout canceled: nothing was charged and your plan is unchanged."
    )
    assert_accessible(page)
    assert subscription(live, tenant)["status"] == "none"


def test_portal_cancel_and_resume_show_on_the_overview(live: Live, page: Page, uid: str) -> None:
    tenant = f"portal-{uid}"
    live.tenant(tenant, "Portal GmbH")
    pay_by_api(live, tenant, "team")
    open_billing(page, live, tenant)
    ends = subscription(live, tenant)["current_period_end"]
    day = _day(ends, "Europe/Berlin")
    expect(page.locator("#headline")).to_have_text(f"Team — renews on {day}")

    page.get_by_role("button", name="Manage payment and invoices").click()
    expect(page.get_by_role("heading", name="Billing portal")).to_be_visible()
    page.get_by_role("button", name="Cancel subscription").click()
    expect(page.get_by_role("status")).to_have_text(
        "Your subscription will end at the end of the period."
    )
    live.settle()
    page.get_by_role("link", name="Return").click()
    expect(page.locator("#headline")).to_have_text(f"Team — cancels on {day}")
    expect(page.get_by_role("status").first).to_contain_text(
        f"Your subscription ends on {day}. You can resume it in the billing portal until then."
    )
    assert_accessible(page)

    page.get_by_role("button", name="Update card in the billing portal").or_(
        page.get_by_role("button", name="Manage payment and invoices")
    ).first.click()
    page.get_by_role("button", name="Resume subscription").click()
    expect(page.get_by_role("status")).to_have_text("Your subscription continues.")
    live.settle()
    page.get_by_role("link", name="Return").click()
    expect(page.locator("#headline")).to_have_text(f"Team — renews on {day}")
    expect(page.get_by_text("Your subscription ends on")).to_have_count(0)
    assert_accessible(page)


def test_upgrade_shows_the_amount_due_today_and_grants_once(
    live: Live, page: Page, uid: str
) -> None:
    tenant = f"grower-{uid}"
    live.tenant(tenant, "Grower BV")
    live.ok("POST", f"/v1/tenants/{tenant}/trial", json={"plan_id": "pro"})  # the one trial
    pay_by_api(live, tenant, "pro")  # then pays: no second trial
    before = subscription(live, tenant)
    open_billing(page, live, tenant)
    page.get_by_role("link", name="Change plan").click()
    expect(page.get_by_role("region", name="Pro")).to_contain_text("Current plan")
    page.get_by_role("link", name="Upgrade to Team").click()
    expect(page.get_by_role("heading", name="Upgrade to Team")).to_be_visible()
    assert_accessible(page)

    due = live.run(_preview_due_today(live, before["stripe_subscription_id"], "team"))
    assert 0 < due <= 8000
    shown = page.locator("#due-today").inner_text()
    # the provider prorates by the second: asked a moment later, it may say a cent less
    assert shown in {f"US${cents / 100:,.2f}" for cents in (due, due + 1)}, (shown, due)
    row = page.get_by_role("row", name=re.compile(r"^Messages \(daily\)"))
    expect(row.get_by_role("cell")).to_have_text(
        ["Messages (daily)", "1,000 messages a day", "20,000 messages a day"]
    )
    page.get_by_role("button", name="Confirm upgrade to Team").click()
    expect(page.get_by_role("status")).to_have_text(
        "Your plan has changed. The new limits apply now."
    )
    expect(page.get_by_text("0 of 20,000")).to_be_visible()  # messages today, Team's limit
    live.settle()
    page.reload()
    upgrade_rows = page.get_by_role("table", name=re.compile("Credits you can spend")).get_by_role(
        "row", name=re.compile("upgrade")
    )
    expect(upgrade_rows).to_have_count(1)
    assert_accessible(page)
    grants = live.ok("GET", f"/v1/tenants/{tenant}/wallet")["grants"]
    assert [g["source"] for g in grants].count("upgrade") == 1, grants


async def _preview_due_today(live: Live, subscription_id: str, plan_id: str) -> int:
    async with stripe_sdk(live.stack) as client:
        sub = await client.v1.subscriptions.retrieve_async(subscription_id)
        [(price_id,)] = await live.stack.fetch(
            "SELECT stripe_price_id FROM plan_stripe_prices WHERE plan_id = %s", plan_id
        )
        preview = await client.v1.invoices.create_preview_async(
            params={
                "customer": str(sub.customer),
                "subscription": subscription_id,
                "subscription_details": {
                    "items": [{"id": sub["items"]["data"][0]["id"], "price": price_id}],
                    "proration_behavior": "always_invoice",
                },
            }
        )
        return int(preview.amount_due)


def test_an_expired_trial_blocks_with_a_banner_and_in_the_sidecar(
    live: Live, page: Page, uid: str
) -> None:
    tenant = f"trier-{uid}"
    live.tenant(tenant, "Trier SA")
    live.ok("POST", f"/v1/tenants/{tenant}/trial", json={"plan_id": "pro"})
    open_billing(page, live, tenant)
    expect(page.locator("#headline")).to_have_text("Pro trial — 14 days left")
    live.clock.offset = timedelta(days=12)
    try:
        page.reload()  # twelve days on, the twelve-hour session has ended
        expect(page.get_by_role("heading", name="This link has expired")).to_be_visible()
        open_billing(page, live, tenant)  # a fresh link from the app
        expect(page.get_by_role("status").first).to_contain_text("Your trial ends on")
        live.clock.offset = timedelta(days=15)
        open_billing(page, live, tenant)
        banner = page.get_by_role("alert")
        expect(banner).to_contain_text(
            "Your trial has ended: usage is blocked until you choose a plan."
        )
        assert_accessible(page)
        with live.quota() as quota:
            answer = quota.check_and_consume(tenant, "messages", 1, request_id=f"m-{uid}")
        assert not answer.allowed and answer.reason == pb.REASON_TRIAL_EXPIRED
        banner.get_by_role("link", name="Choose a plan").click()
        expect(page.get_by_role("button", name="Choose Pro")).to_be_visible()
        expect(page.get_by_text("14-day free trial")).to_have_count(0)  # the trial is used
        assert_accessible(page)
    finally:
        live.clock.offset = timedelta()


def test_a_reached_limit_shows_on_the_meter_the_limit_page_and_in_the_sidecar(
    live: Live, page: Page, uid: str
) -> None:
    tenant = f"chatty-{uid}"
    live.tenant(tenant, "Chatty Oy", timezone="Europe/Helsinki")
    live.ok("PUT", f"/v1/tenants/{tenant}/subscription", json={"plan_id": "free"})
    with live.quota() as quota:
        for n in range(5):
            assert quota.check_and_consume(tenant, "messages", 10, request_id=f"c{n}-{uid}").allowed
    open_billing(page, live, tenant)
    meter = page.locator(".meter", has_text="Messages · daily")
    expect(meter).to_contain_text("50 of 50 · limit reached")
    expect(meter).to_contain_text("Resets at 00:00 Europe/Helsinki")
    expect(meter.get_by_role("meter")).to_have_attribute("aria-valuenow", "50")
    assert_accessible(page)

    page.goto(f"{live.url}/billing/limits/messages")
    expect(page.get_by_role("heading", name="Messages limit reached")).to_be_visible()
    sentence = page.locator("#denial").inner_text()
    expect(page.get_by_role("button", name="Upgrade to Pro")).to_be_visible()
    assert_accessible(page)
    with live.quota() as quota:
        answer = quota.check_and_consume(tenant, "messages", 1, request_id=f"over-{uid}")
    assert not answer.allowed and answer.reason == pb.REASON_QUOTA_EXCEEDED
    assert answer.message == sentence
    assert answer.upgrade_plan_id == "pro"


def test_a_failed_renewal_shows_past_due_until_the_card_is_updated(
    live: Live, page: Page, uid: str
) -> None:
    tenant = f"late-{uid}"
    live.tenant(tenant, "Late Payer Ltd")
    clock_id, now = live.run(_customer_on_a_test_clock(live, tenant))
    open_billing(page, live, tenant)
    page.goto(f"{live.url}/billing/plans")
    page.get_by_role("button", name="Choose Team").click()
    page.get_by_label("Card number").fill("4000 0000 0000 0341")  # pays now, fails later
    page.get_by_role("button", name="Pay").click()
    expect(page.get_by_role("heading")).to_have_text("Your plan is active", timeout=20_000)

    live.run(_advance(live, clock_id, now + 32 * DAY))
    wait_for(lambda: subscription(live, tenant)["status"] == "past_due", "past due")
    sub = subscription(live, tenant)
    since = datetime.fromisoformat(sub["past_due_since"])
    grace = live.stack.settings.past_due_grace_days
    failed_on, pay_by = (
        _day(since, "Europe/Berlin"),
        _day(since + timedelta(grace), "Europe/Berlin"),
    )
    page.goto(f"{live.url}/billing")
    expect(page.locator("#headline")).to_have_text(
        f"Payment failed on {failed_on} — update your card by {pay_by} to keep access"
    )
    banner = page.locator(".banner", has_text="failed")
    expect(banner).to_contain_text(
        f"The payment of {failed_on} failed. Update your card by {pay_by} to keep access."
    )
    assert_accessible(page)

    banner.get_by_role("button", name="Update card in the billing portal").click()
    page.get_by_label("New card").fill("4242 4242 4242 4242")
    page.get_by_role("button", name="Update card").click()
    expect(page.get_by_role("status")).to_have_text("Your card was updated.")
    live.settle()
    page.get_by_role("link", name="Return").click()
    expect(page.locator("#headline")).to_have_text(re.compile(r"^Team — renews on "))
    expect(page.locator(".banner")).to_have_count(0)
    assert subscription(live, tenant)["status"] == "active"


async def _customer_on_a_test_clock(live: Live, tenant: str) -> tuple[str, int]:
    """A Stripe customer whose time the test moves (as a dashboard user sets one up)."""
    async with stripe_sdk(live.stack) as client:
        clock = await client.v1.test_helpers.test_clocks.create_async(
            params={"frozen_time": int(time.time())}
        )
        customer = await client.v1.customers.create_async(
            params={"email": f"owner@{tenant}.example", "test_clock": clock.id}
        )
    await live.stack.fetch(
        "WITH t AS (UPDATE tenants SET stripe_customer_id = %s WHERE tenant_id = %s"
        " RETURNING stripe_customer_id, tenant_id) INSERT INTO provider_customers"
        " SELECT stripe_customer_id, tenant_id FROM t RETURNING 1",
        customer.id,
        tenant,
    )
    return clock.id, int(clock.frozen_time)


async def _advance(live: Live, clock_id: str, to: int) -> None:
    async with stripe_sdk(live.stack) as client:
        await client.v1.test_helpers.test_clocks.advance_async(clock_id, params={"frozen_time": to})
    await live.stack.settle()


def _day(at: str | datetime, zone: str) -> str:
    """How the pages write a day for an en-GB reader."""
    moment = datetime.fromisoformat(at) if isinstance(at, str) else at
    return Formats("en_GB", zone, datetime.now(moment.tzinfo)).day(moment)


def test_phone_width_and_keyboard_only(live: Live, page: Page, uid: str) -> None:
    tenant = f"phone-{uid}"
    live.tenant(tenant, "Phone First Ltd")
    live.ok("PUT", f"/v1/tenants/{tenant}/subscription", json={"plan_id": "free"})
    page.set_viewport_size({"width": 360, "height": 740})
    open_billing(page, live, tenant)
    for path in ("/billing", "/billing/plans", "/billing/limits/tokens"):
        page.goto(f"{live.url}{path}")
        overflow = page.evaluate(
            "() => document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0, (path, overflow)  # nothing wider than the phone
        assert_accessible(page)

    # keyboard only: the skip link first, then on to "Change plan", and Enter follows it
    page.goto(f"{live.url}/billing")
    page.keyboard.press("Tab")
    expect(page.get_by_role("link", name="Skip to content")).to_be_focused()
    for _ in range(10):
        page.keyboard.press("Tab")
        if page.evaluate("() => document.activeElement.textContent.trim()") == "Change plan":
            break
    expect(page.get_by_role("link", name="Change plan")).to_be_focused()
    page.keyboard.press("Enter")
    expect(page).to_have_url(f"{live.url}/billing/plans")
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")  # the skip link moves the focus to the content
    expect(page).to_have_url(f"{live.url}/billing/plans#main")
