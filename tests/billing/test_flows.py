"""Checkout, portal, plan changes and trials: the paths users take and the ones refused."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import httpx
import stripe

from billing_core.billing.subscriptions import expire_trials
from billing_core.db.unit_of_work import Database
from tests.billing.conftest import Stack, pay, stripe_sdk

DAY = 86_400


async def make(api: httpx.AsyncClient, tenant: str, **plan: object) -> str:
    r = await api.post("/v1/plans", json={"quotas": [], **plan})
    assert r.status_code == 201, r.text
    r2 = await api.post("/v1/tenants", json={"tenant_id": tenant, "name": tenant})
    assert r2.status_code in (201, 409)
    plan_id: str = r.json()["plan_id"]
    return plan_id


async def on_test_clock(client: stripe.StripeClient, stack: Stack, tenant: str) -> tuple[str, int]:
    clock = await client.v1.test_helpers.test_clocks.create_async(
        params={"frozen_time": int(time.time())}
    )
    customer = await client.v1.customers.create_async(params={"test_clock": clock.id})
    await stack.fetch(
        "UPDATE tenants SET stripe_customer_id = %s WHERE tenant_id = %s RETURNING 1",
        customer.id,
        tenant,
    )
    return clock.id, int(clock.frozen_time)


async def test_checkout_refusals(stack: Stack, uid: str) -> None:
    t = f"r-{uid}"
    async with stack.api() as api:
        paid = await make(api, t, name=f"paid-{uid}", price_cents=1500)
        free = await make(api, t, name=f"free-{uid}", price_cents=0)
        ent = await make(api, t, name=f"ent-{uid}", price_cents=99_000, enterprise=True)
        for plan_id, text in ((free, "not sold through checkout"),
                              (ent, "not sold through checkout"),
                              ("nope", "unknown plan")):  # fmt: skip
            r = await api.post(f"/v1/tenants/{t}/checkout-sessions", json={"plan_id": plan_id})
            assert r.status_code in (404, 409) and text in r.json()["detail"], r.text
        r = await api.post(f"/v1/tenants/{t}/portal-sessions", json={})
        assert r.status_code == 409 and "never paid" in r.json()["detail"]
        r = await api.post(f"/v1/tenants/{t}/subscription/change", json={"plan_id": paid})
        assert r.status_code == 409 and "no paid subscription" in r.json()["detail"]
        r = await api.post(f"/v1/tenants/ghost-{uid}/checkout-sessions", json={"plan_id": paid})
        assert r.status_code == 404
        # a declined card: the page says so, Stripe creates nothing, nothing changes here
        r = await api.post(f"/v1/tenants/{t}/checkout-sessions", json={"plan_id": paid})
        declined = await pay(r.json()["url"], "4000 0000 0000 0002")
        assert declined.status_code == 200 and "Your card was declined." in declined.text
        await stack.settle()
        assert (await api.get(f"/v1/tenants/{t}/subscription")).json()["status"] == "none"
        # paying afterwards works; a second checkout is refused while it is live
        assert (await pay(r.json()["url"])).status_code == 303
        await stack.settle()
        r = await api.post(f"/v1/tenants/{t}/checkout-sessions", json={"plan_id": paid})
        assert r.status_code == 409 and "already pays" in r.json()["detail"]
        await api.post(f"/v1/plans/{paid}/archive")
        r = await api.post(f"/v1/tenants/{t}/subscription/change", json={"plan_id": paid})
        assert r.status_code == 200  # the plan it already has: nothing to do


async def test_an_upgrade_whose_payment_fails_changes_nothing(stack: Stack, uid: str) -> None:
    t = f"u-{uid}"
    async with stack.api() as api:
        small = await make(api, t, name=f"small-{uid}", price_cents=1000)
        large = await make(api, t, name=f"large-{uid}", price_cents=4000,
                           wallet_grants=[{"on": "upgrade", "amount_micros": 9}])  # fmt: skip
        r = await api.post(f"/v1/tenants/{t}/checkout-sessions", json={"plan_id": small})
        await pay(r.json()["url"])
        await stack.settle()
        portal = (await api.post(f"/v1/tenants/{t}/portal-sessions", json={})).json()
        async with httpx.AsyncClient() as browser:
            session_id = portal["url"].rsplit("/", 1)[1]
            await browser.post(
                f"{stack.emulator_url}/portal/{session_id}/card",
                data={"card": "4242 4242 4242 4242"},
            )
        # the card is now declined for everything
        customer = (
            await stack.fetch("SELECT stripe_customer_id FROM tenants WHERE tenant_id = %s", t)
        )[0][0]
        stack.emulator_app.state.emulator.cards[customer] = "declined"
        r = await api.post(f"/v1/tenants/{t}/subscription/change", json={"plan_id": large})
        assert r.status_code == 409 and "did not go through" in r.json()["detail"]
        await stack.settle()
        sub = (await api.get(f"/v1/tenants/{t}/subscription")).json()
        assert sub["plan_id"] == small and sub["status"] == "active"
        grants = await stack.fetch(
            "SELECT count(*) FROM wallet_grants WHERE tenant_id = %s AND source = 'upgrade'", t
        )
        assert grants == [(0,)]


async def test_stripe_trial_warns_then_becomes_paid_without_a_gap(stack: Stack, uid: str) -> None:
    t = f"tr-{uid}"
    async with stack.api() as api, stripe_sdk(stack) as client:
        plan = await make(api, t, name=f"trial-{uid}", price_cents=2000, trial=True,
                          trial_days=14)  # fmt: skip
        clock, now = await on_test_clock(client, stack, t)
        r = await api.post(f"/v1/tenants/{t}/checkout-sessions", json={"plan_id": plan})
        async with httpx.AsyncClient() as browser:
            page = await browser.get(r.json()["url"])
        assert "14-day free trial" in page.text
        await pay(r.json()["url"])
        await stack.settle()
        sub = (await api.get(f"/v1/tenants/{t}/subscription")).json()
        assert sub["status"] == "trialing" and "free trial" in sub["explanation"]
        tenant = (await api.get(f"/v1/tenants/{t}")).json()
        assert tenant["trial_used_at"] is not None  # the one trial is spent
        # our own trial expiry leaves Stripe's trials alone, even past their end
        async with Database(stack.pool).transaction() as uow:
            later = datetime.now(UTC) + timedelta(days=30)
            await expire_trials(uow, "tests", later)
        assert (await api.get(f"/v1/tenants/{t}/subscription")).json()["status"] == "trialing"
        await client.v1.test_helpers.test_clocks.advance_async(
            clock, params={"frozen_time": now + 12 * DAY}
        )
        await stack.settle()
        notes = (await api.get(f"/v1/tenants/{t}/notifications")).json()["items"]
        assert any("trial ends in 3 days" in n["message"] for n in notes)
        await client.v1.test_helpers.test_clocks.advance_async(
            clock, params={"frozen_time": now + 15 * DAY}
        )
        await stack.settle()
        sub = (await api.get(f"/v1/tenants/{t}/subscription")).json()
        assert sub["status"] == "active" and sub["plan_id"] == plan
        statuses = await stack.fetch(
            "SELECT DISTINCT status FROM subscriptions WHERE tenant_id = %s", t
        )
        assert statuses == [("active",)]  # never trial_expired on the way


async def test_a_card_less_trial_expires_or_continues_into_a_paid_plan(
    stack: Stack, uid: str
) -> None:
    async with stack.api() as api:
        plan = await make(api, f"a-{uid}", name=f"ct-{uid}", price_cents=2000, trial=True,
                          trial_days=7)  # fmt: skip
        await api.post("/v1/tenants", json={"tenant_id": f"b-{uid}", "name": "B"})
        for t in (f"a-{uid}", f"b-{uid}"):
            r = await api.post(f"/v1/tenants/{t}/trial", json={"plan_id": plan})
            assert r.status_code == 201 and r.json()["status"] == "trialing"
        # b pays during the trial: the paid plan takes over at once, no trial again
        r = await api.post(f"/v1/tenants/b-{uid}/checkout-sessions", json={"plan_id": plan})
        async with httpx.AsyncClient() as browser:
            page = await browser.get(r.json()["url"])
        assert "due today" in page.text
        await pay(r.json()["url"])
        await stack.settle()
        later = datetime.now(UTC) + timedelta(days=8)
        async with Database(stack.pool).transaction() as uow:
            assert await expire_trials(uow, "tests", later) >= 1
        async with Database(stack.pool).transaction() as uow:
            assert await expire_trials(uow, "tests", later) == 0  # idempotent
        a = (await api.get(f"/v1/tenants/a-{uid}/subscription")).json()
        b = (await api.get(f"/v1/tenants/b-{uid}/subscription")).json()
        assert a["status"] == "trial_expired" and "has ended" in a["explanation"]
        assert b["status"] == "active" and b["plan_id"] == plan


async def test_a_price_change_keeps_old_subscribers_and_sells_the_new_price(
    stack: Stack, uid: str
) -> None:
    async with stack.api() as api:
        plan = await make(api, f"old-{uid}", name=f"rp-{uid}", price_cents=1000)
        r = await api.post(f"/v1/tenants/old-{uid}/checkout-sessions", json={"plan_id": plan})
        await pay(r.json()["url"])
        await stack.settle()
        [(old_price,)] = await stack.fetch(
            "SELECT stripe_price_id FROM plans WHERE plan_id = %s", plan
        )
        r = await api.patch(f"/v1/plans/{plan}", json={"price_cents": 1500})
        assert r.json()["stripe_price_id"] is None  # Stripe prices never change
        await api.post("/v1/tenants", json={"tenant_id": f"new-{uid}", "name": "N"})
        r = await api.post(f"/v1/tenants/new-{uid}/checkout-sessions", json={"plan_id": plan})
        page_price = stack.emulator_app.state.emulator.objects[r.json()["session_id"]]
        assert page_price["amount_total"] == 1500
        await pay(r.json()["url"])
        # the old subscriber's events still find the plan
        r = await api.post(
            f"/v1/tenants/old-{uid}/subscription/cancel", json={"cancel_at_period_end": True}
        )
        assert r.status_code == 200, r.text
        await stack.settle()
        failed = (await api.get("/v1/webhook-events", params={"status": "failed"})).json()
        assert failed["items"] == []
        prices = await stack.fetch(
            "SELECT count(*) FROM plan_stripe_prices WHERE plan_id = %s", plan
        )
        assert prices == [(2,)]
        for t in (f"old-{uid}", f"new-{uid}"):
            sub = (await api.get(f"/v1/tenants/{t}/subscription")).json()
            assert sub["plan_id"] == plan and sub["status"] == "active"
        assert old_price


async def test_checkout_recovers_when_stripe_lost_the_customer_and_the_price(
    stack: Stack, uid: str
) -> None:
    t = f"lost-{uid}"
    async with stack.api() as api:
        plan = await make(
            api, t, name=f"lost-{uid}", price_cents=1100, stripe_price_id=f"price_gone_{uid}"
        )
        await stack.fetch(
            "UPDATE tenants SET stripe_customer_id = %s WHERE tenant_id = %s RETURNING 1",
            f"cus_gone_{uid}",
            t,
        )
        r = await api.post(f"/v1/tenants/{t}/checkout-sessions", json={"plan_id": plan})
        assert r.status_code == 201, r.text
        assert (await pay(r.json()["url"])).status_code == 303
        await stack.settle()
        sub = (await api.get(f"/v1/tenants/{t}/subscription")).json()
        assert sub["status"] == "active" and sub["plan_id"] == plan
        assert sub["stripe_customer_id"] != f"cus_gone_{uid}"
        [(price,)] = await stack.fetch("SELECT stripe_price_id FROM plans WHERE plan_id = %s", plan)
        assert price != f"price_gone_{uid}"
