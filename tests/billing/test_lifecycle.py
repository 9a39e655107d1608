"""The whole paid lifecycle through the local Stripe and the control plane — checkout →
active → renewal → upgrade → payment failure → recovery → cancel — delivered live and in
order to one database, then replayed 5 times, shuffled and concurrently, to another: the same
final state, the same grants, nothing twice."""

from __future__ import annotations

import asyncio
import json
import random
import time
from typing import Any

import httpx
import stripe

from stripe_emulator.webhooks import sign
from tests.billing.conftest import Stack, billing_stack, pay, stripe_sdk
from tests.conftest import fresh_database

DAY = 86_400
PRO = {
    "name": "Pro",
    "price_cents": 2000,
    "trial": False,
    "wallet_grants": [
        {"on": "start", "amount_micros": 1_000_000},
        {"on": "renewal", "amount_micros": 500_000},
    ],
    "quotas": [{"resource": "messages", "period": "monthly", "limit": 1000}],
}
TEAM = {"name": "Team", "price_cents": 5000,
        "wallet_grants": [{"on": "upgrade", "amount_micros": 2_000_000},
                          {"on": "renewal", "amount_micros": 800_000}],
        "quotas": [{"resource": "messages", "period": "monthly", "limit": 5000}]}  # fmt: skip


async def status_of(stack: Stack, tenant: str) -> tuple[str, str | None, bool]:
    async with stack.api() as api:
        sub = (await api.get(f"/v1/tenants/{tenant}/subscription")).json()
    return sub["status"], sub["plan_id"], sub["cancel_at_period_end"]


async def snapshot(stack: Stack, tenant: str) -> dict[str, Any]:
    subs = await stack.fetch(
        "SELECT stripe_subscription_id, plan_id, status, is_current, cancel_at_period_end,"
        " current_period_start, current_period_end, billing_cycle_anchor, trial_end,"
        " (past_due_since IS NOT NULL) FROM subscriptions WHERE tenant_id = %s"
        " ORDER BY stripe_subscription_id",
        tenant,
    )
    grants = await stack.fetch(
        "SELECT source, amount_micros, grant_key FROM wallet_grants WHERE tenant_id = %s"
        " ORDER BY grant_key",
        tenant,
    )
    [(balance, ledger)] = await stack.fetch(
        "SELECT (SELECT balance_micros FROM wallets WHERE tenant_id = %s),"
        " (SELECT sum(delta_micros) FROM wallet_ledger WHERE tenant_id = %s)",
        tenant,
        tenant,
    )
    return {"subscriptions": subs, "grants": grants, "balance": balance, "ledger": ledger}


async def make_plans(api: httpx.AsyncClient, uid: str, **stripe_ids: str) -> dict[str, str]:
    ids = {}
    for name, body in (("pro", PRO), ("team", TEAM)):
        extra = {"stripe_price_id": stripe_ids[name]} if stripe_ids else {}
        r = await api.post("/v1/plans", json={**body, "name": f"{body['name']}-{uid}", **extra})
        assert r.status_code == 201, r.text
        ids[name] = r.json()["plan_id"]
    return ids


async def test_lifecycle_in_order_then_replayed_shuffled_gives_the_same_books(
    stack: Stack, server_url: str, uid: str
) -> None:
    async with stripe_sdk(stack) as client:
        await _lifecycle(stack, server_url, uid, client)


async def _lifecycle(stack: Stack, server_url: str, uid: str, client: stripe.StripeClient) -> None:
    clock = await client.v1.test_helpers.test_clocks.create_async(
        params={"frozen_time": int(time.time())}
    )
    now = int(clock.frozen_time)
    tenant = f"life-{uid}"

    async def advance(days: int) -> None:
        nonlocal now
        now += days * DAY
        await client.v1.test_helpers.test_clocks.advance_async(
            clock.id, params={"frozen_time": now}
        )
        await stack.settle()

    async with stack.api() as api:
        plans = await make_plans(api, uid)
        r = await api.post("/v1/tenants", json={"tenant_id": tenant, "name": "Life Co"})
        assert r.status_code == 201
        # the customer lives on a test clock so that months can pass in a test
        customer = await client.v1.customers.create_async(
            params={"email": "owner@life.test", "test_clock": clock.id}
        )
        await stack.fetch(
            "UPDATE tenants SET stripe_customer_id = %s WHERE tenant_id = %s RETURNING 1",
            customer.id,
            tenant,
        )
        # checkout → active, start grant
        r = await api.post(
            f"/v1/tenants/{tenant}/checkout-sessions", json={"plan_id": plans["pro"]}
        )
        assert r.status_code == 201, r.text
        paid = await pay(r.json()["url"])
        assert paid.status_code == 303 and "/billing/return" in paid.headers["location"]
        await stack.settle()
        assert await status_of(stack, tenant) == ("active", plans["pro"], False)
        # renewal → renewal grant
        await advance(31)
        assert await status_of(stack, tenant) == ("active", plans["pro"], False)
        # upgrade (charged now, prorated) → upgrade grant
        r = await api.post(
            f"/v1/tenants/{tenant}/subscription/change", json={"plan_id": plans["team"]}
        )
        assert r.status_code == 200, r.text
        assert r.json()["plan_id"] == plans["team"]
        await stack.settle()
        # a card that fails the next renewal, put in through the portal
        portal = (await api.post(f"/v1/tenants/{tenant}/portal-sessions", json={})).json()
        async with httpx.AsyncClient() as browser:
            session_id = portal["url"].rsplit("/", 1)[1]
            card_form = f"{stack.emulator_url}/portal/{session_id}/card"
            r = await browser.post(card_form, data={"card": "4000 0000 0000 0341"})
            assert "Your card was updated" in r.text
            # renewal fails → past due
            await advance(31)
            assert (await status_of(stack, tenant))[0] == "past_due"
            notes = (await api.get(f"/v1/tenants/{tenant}/notifications")).json()["items"]
            assert any("failed" in n["message"] for n in notes)
            # recovery: a good card pays the open invoice
            r = await browser.post(card_form, data={"card": "4242 4242 4242 4242"})
            assert "Your card was updated" in r.text
        await stack.settle()
        assert await status_of(stack, tenant) == ("active", plans["team"], False)
        # cancel at period end → canceled when the period ends
        r = await api.post(
            f"/v1/tenants/{tenant}/subscription/cancel", json={"cancel_at_period_end": True}
        )
        assert r.status_code == 200 and r.json()["cancel_at_period_end"] is True
        assert "ends on" in r.json()["explanation"]
        await advance(31)
        assert (await status_of(stack, tenant))[0] == "canceled"
        failed = (await api.get("/v1/webhook-events", params={"status": "failed"})).json()
        assert failed["items"] == []

    in_order = await snapshot(stack, tenant)
    trail = await stack.fetch(
        "SELECT actor, after->>'status' FROM audit_log WHERE entity_id = %s"
        " AND action LIKE 'subscription.customer.subscription%%' ORDER BY audit_id",
        tenant,
    )
    assert all(actor.startswith("stripe:evt_") for actor, _ in trail)
    assert [status for _, status in trail][-1] == "canceled"
    grants = [(source, amount) for source, amount, _ in in_order["grants"]]
    assert sorted(grants) == sorted(
        [("start", 1_000_000), ("renewal", 500_000), ("upgrade", 2_000_000), ("renewal", 800_000)]
    )
    assert in_order["balance"] == in_order["ledger"] == 4_300_000

    # every event Stripe sent, replayed to a second deployment: 5 times, shuffled, at once
    events = [e for e in stack.emulator_app.state.emulator.events if e["data"]["object"]]
    with fresh_database(server_url, "bp_replay") as replay_db:
        async with billing_stack(
            replay_db, emulator=stack.emulator_app, emulator_url=stack.emulator_url
        ) as replica:
            prices = dict(
                await stack.fetch(
                    "SELECT CASE WHEN name LIKE 'Pro-%%' THEN 'pro' ELSE 'team' END,"
                    " stripe_price_id FROM plans WHERE plan_id = ANY(%s)",
                    list(plans.values()),
                )
            )
            async with replica.api() as api:
                # new plan ids; the Stripe prices tie them to the first deployment's plans
                replica_plans = await make_plans(api, uid, **prices)
                await api.post("/v1/tenants", json={"tenant_id": tenant, "name": "Life Co"})
            await replica.fetch(
                "UPDATE tenants SET stripe_customer_id = %s WHERE tenant_id = %s RETURNING 1",
                customer.id,
                tenant,
            )
            deliveries = [e for e in events for _ in range(5)]
            random.Random(uid).shuffle(deliveries)
            secret = replica.settings.stripe_webhook_secret
            async with httpx.AsyncClient(base_url=replica.url, timeout=60) as http:

                async def deliver(event: dict[str, Any]) -> int:
                    body = json.dumps(event).encode()
                    for _ in range(10):  # like Stripe: retry what was not acknowledged
                        r = await http.post(
                            "/webhooks/stripe",
                            content=body,
                            headers={"Stripe-Signature": sign(body, secret)},
                        )
                        if r.status_code == 200:
                            return r.status_code
                        await asyncio.sleep(0.05)
                    return r.status_code

                statuses = await asyncio.gather(*(deliver(e) for e in deliveries))
            assert set(statuses) == {200}
            replayed = await snapshot(replica, tenant)
            stored = await replica.fetch(
                "SELECT count(*), count(*) FILTER (WHERE status = 'processed')"
                " FROM stripe_webhook_events"
            )
            assert stored == [(len(events), len(events))]

    def comparable(snap: dict[str, Any], plan_ids: dict[str, str]) -> dict[str, Any]:
        names = {v: k for k, v in plan_ids.items()}
        subs = [(s[0], names[s[1]], *s[2:]) for s in snap["subscriptions"]]
        return {**snap, "subscriptions": subs}

    assert comparable(replayed, replica_plans) == comparable(in_order, plans)
