"""An operator on the admin pages, in Chromium: signs in with an admin key, creates a plan
(an invalid quota is refused next to its field), sees the sidecar enforce it, and
re-processes a failed webhook event."""

from __future__ import annotations

import json
import re

import httpx
from playwright.sync_api import Page, expect
from quota_client import pb

from stripe_emulator.webhooks import sign
from tests.browser.conftest import Live, assert_accessible, sign_in


def test_a_wrong_key_is_refused_and_sign_out_ends_the_session(live: Live, page: Page) -> None:
    page.goto(f"{live.url}/admin/tenants")
    page.get_by_label("Admin API key").fill("bpk_not-a-key")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_have_text("That key is not a valid admin API key.")
    assert_accessible(page)
    page.get_by_label("Admin API key").fill(live.stack.key)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(f"{live.url}/admin/tenants")  # back where it was going
    page.get_by_role("button", name="Sign out").click()
    page.goto(f"{live.url}/admin/plans")
    expect(page).to_have_url(re.compile(r"/admin/login"))


def test_a_plan_made_on_the_admin_pages_is_offered_and_enforced(
    live: Live, page: Page, uid: str
) -> None:
    sign_in(page, live)
    assert_accessible(page)
    page.get_by_role("link", name="New plan").click()
    name = f"Starter {uid}"
    page.get_by_label("Name", exact=True).fill(name)
    page.get_by_label("Price (USD)").fill("0")
    page.get_by_label("Active (takes new subscribers)").check()
    page.get_by_label("Resource 1").fill("messages")
    page.get_by_label("Period 1").select_option("daily")
    page.get_by_label("Limit 1").fill("-5")
    page.get_by_role("button", name="Create plan").click()

    limit = page.get_by_label("Limit 1")
    expect(limit).to_have_attribute("aria-invalid", "true")
    expect(limit).to_have_accessible_description("The limit must be a whole number, 0 or more.")
    expect(page.get_by_label("Name", exact=True)).to_have_value(name)  # nothing typed is lost
    assert_accessible(page)
    assert live.ok("GET", "/v1/plans", params={"limit": 500})["items"][-1]["name"] != name

    limit.fill("3")
    page.get_by_role("button", name="Create plan").click()
    expect(page.get_by_role("status")).to_have_text("The plan was created.")
    plan = next(p for p in live.ok("GET", "/v1/plans", params={"limit": 500})["items"]
                if p["name"] == name)  # fmt: skip
    assert plan["quotas"] == [
        {"resource": "messages", "period": "daily", "limit": 3, "warn_at": [80, 95],
         "overage": "block"}
    ]  # fmt: skip

    # a workspace owner picks it, and the sidecar holds the workspace to it
    tenant = f"starter-{uid}"
    live.tenant(tenant, "Starter Co")
    owner = page.context.browser.new_context(locale="en-GB")  # type: ignore[union-attr]
    try:
        billing = owner.new_page()
        billing.goto(live.billing_link(tenant))
        billing.get_by_role("link", name="Change plan").click()
        billing.get_by_role("button", name=f"Choose {name}").click()
        expect(billing.get_by_role("status")).to_have_text("You are on the new plan now.")
        expect(billing.locator("#headline")).to_have_text(f"{name} — no payment needed")
    finally:
        owner.close()
    with live.quota() as quota:
        answers = [
            quota.check_and_consume(tenant, "messages", 1, request_id=f"s{n}-{uid}")
            for n in range(4)
        ]
    assert [a.allowed for a in answers] == [True, True, True, False]
    assert answers[-1].reason == pb.REASON_QUOTA_EXCEEDED


def test_a_failed_webhook_is_reprocessed_from_its_page(live: Live, page: Page, uid: str) -> None:
    tenant = f"hooked-{uid}"
    live.tenant(tenant, "Hooked Ltd")
    link = live.ok("POST", f"/v1/tenants/{tenant}/checkout-sessions", json={"plan_id": "team"})
    live.run(live.stack.webhooks(paused=True))
    try:
        with httpx.Client(timeout=20) as http:
            assert http.post(link["url"], data={"card": "4242424242424242"}).status_code == 303
        emulator = live.stack.emulator_app.state.emulator
        created = next(
            e for e in reversed(emulator.events) if e["type"] == "customer.subscription.created"
        )
        # the plan loses its Stripe price for a moment: the event cannot be applied
        [(price_id,)] = live.sql(
            "DELETE FROM plan_stripe_prices WHERE plan_id = 'team' RETURNING stripe_price_id"
        )
        body = json.dumps(created).encode()
        with httpx.Client(base_url=live.url) as http:
            r = http.post(
                "/webhooks/stripe",
                content=body,
                headers={
                    "Content-Type": "application/json",
                    "Stripe-Signature": sign(body, live.stack.settings.stripe_webhook_secret),
                },
            )
        assert r.status_code == 500
        live.sql(
            "INSERT INTO plan_stripe_prices (stripe_price_id, plan_id) VALUES (%s, 'team')"
            " RETURNING 1",
            price_id,
        )

        sign_in(page, live)
        page.get_by_role("navigation", name="Admin").get_by_role(
            "link", name="Webhook events"
        ).click()
        expect(page.get_by_label("Status")).to_have_value("failed")
        row = page.get_by_role("row", name=re.compile(created["id"]))
        expect(row).to_contain_text("no plan sells")
        assert_accessible(page)
        row.get_by_role("link", name=created["id"]).click()
        expect(page.locator("#event-status")).to_have_text("failed")
        page.get_by_role("button", name="Re-process this event").click()
        expect(page.get_by_role("status")).to_have_text("The event was processed again.")
        expect(page.locator("#event-status")).to_have_text("processed")
        expect(page.get_by_role("button", name="Re-process this event")).to_have_count(0)
        assert_accessible(page)
    finally:
        live.run(live.stack.webhooks(paused=False))
    live.settle()
    sub = live.ok("GET", f"/v1/tenants/{tenant}/subscription")
    assert sub["status"] == "active" and sub["plan_id"] == "team"
    entries = live.ok("GET", "/v1/audit-log", params={"action": "webhook.reprocess"})["items"]
    assert any(e["entity_id"] == created["id"] for e in entries), entries
