"""An operator's daily work on the admin pages, in Chromium: finding a tenant, granting
credits, enterprise overrides the sidecar then enforces, opening billing as the tenant, a
new model price, and the audit log that shows each of these."""

from __future__ import annotations

import re

from playwright.sync_api import Page, expect
from quota_client import pb

from tests.browser.conftest import Live, assert_accessible, sign_in


def test_find_a_tenant_grant_credits_and_see_it_in_the_audit_log(
    live: Live, page: Page, uid: str
) -> None:
    tenant = f"gift-{uid}"
    live.tenant(tenant, f"Gift Shop {uid}")
    sign_in(page, live)
    page.get_by_role("navigation", name="Admin").get_by_role("link", name="Tenants").click()
    page.get_by_label("Search").fill(f"gift shop {uid}")  # by name, any case
    page.get_by_role("button", name="Search").click()
    page.get_by_role("link", name=tenant).click()
    expect(page.get_by_role("heading", level=1)).to_contain_text(f"Gift Shop {uid}")
    assert_accessible(page)

    page.get_by_label("Credits to grant").fill("twelve")
    page.get_by_label("Reason").fill("support goodwill")
    page.get_by_role("button", name="Grant credits").click()
    expect(page.get_by_role("alert")).to_have_text("Enter an amount like 19.99.")
    assert live.ok("GET", f"/v1/tenants/{tenant}/wallet")["balance_micros"] == 0

    page.get_by_label("Credits to grant").fill("12.50")
    page.get_by_label("Reason").fill("support goodwill")
    page.get_by_label("Expires after days (empty: never)").fill("30")
    page.get_by_role("button", name="Grant credits").click()
    expect(page.get_by_role("status")).to_have_text("The credits were granted.")
    expect(page.get_by_role("row", name=re.compile("support goodwill"))).to_contain_text("US$12.50")
    assert live.ok("GET", f"/v1/tenants/{tenant}/wallet")["balance_micros"] == 12_500_000

    page.get_by_role("link", name="All of this tenant's audit entries").click()
    row = page.get_by_role("row", name=re.compile("wallet.grant"))
    expect(row).to_have_count(1)
    expect(row).to_contain_text(tenant)
    expect(page.get_by_label("Entity id")).to_have_value(tenant)
    assert_accessible(page)
    page.get_by_label("Action").fill("tenant.create")
    page.get_by_role("button", name="Filter").click()
    expect(page.get_by_role("row", name=re.compile("wallet.grant"))).to_have_count(0)
    expect(page.get_by_role("row", name=re.compile("tenant.create"))).to_have_count(1)


def test_enterprise_overrides_are_enforced_and_billing_opens_as_the_tenant(
    live: Live, page: Page, uid: str
) -> None:
    tenant = f"bigco-{uid}"
    live.tenant(tenant, "BigCo AG")
    live.ok("PUT", f"/v1/tenants/{tenant}/subscription", json={"plan_id": "enterprise"})
    sign_in(page, live)
    page.goto(f"{live.url}/admin/tenants/{tenant}")
    overrides = page.get_by_role("region", name="Overrides (enterprise)")
    overrides.get_by_label("Resource 1").fill("messages")
    overrides.get_by_label("Period 1").select_option("daily")
    overrides.get_by_label("Limit 1").fill("5")
    overrides.get_by_role("button", name="Save overrides").click()
    expect(page.get_by_role("status")).to_have_text("The overrides were saved.")
    assert_accessible(page)
    with live.quota() as quota:
        answers = [
            quota.check_and_consume(tenant, "messages", 1, request_id=f"o{n}-{uid}")
            for n in range(6)
        ]
    assert [a.allowed for a in answers] == [True] * 5 + [False]
    assert answers[-1].reason == pb.REASON_QUOTA_EXCEEDED

    page.get_by_role("button", name="Open billing as this tenant").click()
    expect(page).to_have_url(f"{live.url}/billing")
    expect(page.locator("#headline")).to_have_text("Enterprise — contract")
    meter = page.locator(".meter", has_text="Messages · daily")
    expect(meter).to_contain_text("5 of 5 · limit reached")
    entries = live.ok("GET", "/v1/audit-log", params={"entity_id": tenant})["items"]
    assert {"overrides.set", "billing_link.create"} <= {e["action"] for e in entries}


def test_a_new_model_price_with_its_history(live: Live, page: Page, uid: str) -> None:
    sign_in(page, live)
    page.get_by_role("navigation", name="Admin").get_by_role("link", name="Model prices").click()
    page.get_by_label("Provider").fill("acme-ai")
    page.get_by_label("Model").fill(f"m-{uid}")
    page.get_by_label("Input, per million tokens").fill("1.5x")
    page.get_by_role("button", name="Set price").click()
    expect(page.get_by_label("Input, per million tokens")).to_have_accessible_description(
        "Enter an amount like 19.99."
    )
    page.get_by_label("Input, per million tokens").fill("1.50")
    page.get_by_label("Output, per million tokens").fill("6")
    page.get_by_role("button", name="Set price").click()
    expect(page.get_by_role("status")).to_have_text("Saved.")
    row = page.get_by_role("row", name=f"acme-ai/m-{uid}")
    expect(row).to_contain_text("US$1.50")
    expect(row).to_contain_text("US$6.00")
    assert_accessible(page)
    prices = live.ok("GET", "/v1/model-prices", params={"limit": 500})["items"]
    mine = [p for p in prices if p["model"] == f"m-{uid}"]
    assert [(p["input_micros_per_million"], p["output_micros_per_million"]) for p in mine] == [
        (1_500_000, 6_000_000)
    ]
