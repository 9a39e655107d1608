"""A webhook storm: the full lifecycles of many tenants (checkout, upgrade, renewals,
cancellation) through the local Stripe, delivered in order to one deployment; then every
event 3 times, shuffled, by 16 concurrent senders to a second deployment whose control plane
is SIGKILLed and started again in the middle — the same subscriptions and exactly the same
grants. A few events are found stored but never applied (as after a crash between storing
and applying them, with Stripe giving up): housekeeping applies them after its bound."""

from __future__ import annotations

import asyncio
import json
import random
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from psycopg.types.json import Jsonb

from billing_core.billing.api_keys import create_api_key
from billing_core.db.unit_of_work import Database
from stripe_emulator.webhooks import sign
from tests import factories as f
from tests.billing.conftest import EMULATOR_KEY, Stack, billing_stack, pay, stripe_sdk
from tests.billing.test_lifecycle import make_plans
from tests.conftest import fresh_database
from tests.reliability.harness import Process, free_port, pool_of, report, scale, wait_http

DAY = 86_400
SENDERS = 16
COPIES = 3


async def state(fetch: Any, tenants: list[str], plan_names: dict[str, str]) -> dict[str, Any]:
    """Each tenant's subscriptions (plans by name), grants, and wallet against its ledger."""
    out: dict[str, Any] = {}
    for t in tenants:
        subs = await fetch(
            "SELECT stripe_subscription_id, plan_id, status, is_current, cancel_at_period_end,"
            " current_period_start, current_period_end FROM subscriptions WHERE tenant_id = %s"
            " ORDER BY stripe_subscription_id",
            t,
        )
        grants = await fetch(
            "SELECT source, amount_micros, grant_key FROM wallet_grants WHERE tenant_id = %s"
            " ORDER BY grant_key",
            t,
        )
        wallet = await fetch(
            "SELECT (SELECT balance_micros FROM wallets WHERE tenant_id = %s),"
            " (SELECT sum(delta_micros) FROM wallet_ledger WHERE tenant_id = %s)",
            t,
            t,
        )
        out[t] = {
            "subscriptions": [(s[0], plan_names[s[1]], *s[2:]) for s in subs],
            "grants": grants,
            "wallet": wallet,
        }
    return out


async def live_lifecycles(stack: Stack, uid: str, n: int) -> tuple[list[str], dict[str, str]]:
    """n tenants on one test clock: Pro by checkout; every other one upgraded to Team; a
    month passes (renewals); every third cancels at period end; another month passes."""
    async with stripe_sdk(stack) as client, stack.api() as api:
        clock = await client.v1.test_helpers.test_clocks.create_async(
            params={"frozen_time": int(time.time())}
        )
        now = int(clock.frozen_time)
        plans = await make_plans(api, uid)
        tenants = [f"storm-{uid}-{i}" for i in range(n)]
        for t in tenants:
            assert (await api.post("/v1/tenants", json={"tenant_id": t, "name": t})).status_code
            customer = await client.v1.customers.create_async(
                params={"email": f"{t}@storm.test", "test_clock": clock.id}
            )
            await stack.fetch(
                "WITH t AS (UPDATE tenants SET stripe_customer_id = %s WHERE tenant_id = %s"
                " RETURNING stripe_customer_id, tenant_id) INSERT INTO provider_customers"
                " SELECT stripe_customer_id, tenant_id FROM t RETURNING 1",
                customer.id,
                t,
            )
            r = await api.post(f"/v1/tenants/{t}/checkout-sessions", json={"plan_id": plans["pro"]})
            assert r.status_code == 201, r.text
            assert (await pay(r.json()["url"])).status_code == 303
        await stack.settle()
        for t in tenants[::2]:
            r = await api.post(
                f"/v1/tenants/{t}/subscription/change", json={"plan_id": plans["team"]}
            )
            assert r.status_code == 200, r.text
        await stack.settle()

        async def advance(days: int) -> None:
            nonlocal now
            now += days * DAY
            await client.v1.test_helpers.test_clocks.advance_async(
                clock.id, params={"frozen_time": now}
            )
            await stack.settle()

        await advance(31)
        for t in tenants[::3]:
            r = await api.post(
                f"/v1/tenants/{t}/subscription/cancel", json={"cancel_at_period_end": True}
            )
            assert r.status_code == 200, r.text
        await advance(31)
    return tenants, plans


async def test_a_storm_of_duplicated_shuffled_events_across_a_crash(
    server_url: str, uid: str, tmp_path: Path
) -> None:
    n = 10 * scale()
    with fresh_database(server_url, "bp_live") as live_url:
        async with billing_stack(live_url) as stack:
            await _storm(stack, server_url, uid, tmp_path, n)


async def _storm(stack: Stack, server_url: str, uid: str, tmp_path: Path, n: int) -> None:
    tenants, plans = await live_lifecycles(stack, uid, n)
    in_order = await state(stack.fetch, tenants, {v: k for k, v in plans.items()})
    events = [e for e in stack.emulator_app.state.emulator.events if e["data"]["object"]]
    rng = random.Random(uid)
    paid = [e for e in events if e["type"] == "invoice.paid"]
    stale = rng.sample(paid, max(2, n // 10))
    stale_ids = {e["id"] for e in stale}

    with fresh_database(server_url, "bp_storm") as url:
        async with pool_of(url) as pool:
            db = Database(pool)
            async with db.transaction() as uow:
                key = (await create_api_key(uow, "storm", "storm", datetime.now(UTC))).key
            port = free_port()
            secret = "whsec_storm_" + uid
            cp = Process(
                "control_plane",
                {
                    "DATABASE_URL": url,
                    "CONTROL_PLANE_PORT": str(port),
                    "STRIPE_WEBHOOK_SECRET": secret,
                    "STRIPE_EMULATOR_PORT": stack.emulator_url.rsplit(":", 1)[1],
                    "STRIPE_EMULATOR_KEY": EMULATOR_KEY,
                    "AUTH_FAILURES_PER_MINUTE": "0",
                    "TRIAL_EXPIRY_SECONDS": "1",
                    "WEBHOOK_RECLAIM_SECONDS": "2",
                },
                tmp_path / "control-plane.log",
                ("serve",),
            )
            base = f"http://127.0.0.1:{port}"
            cp.start()
            try:
                await wait_http(f"{base}/healthz")
                prices = dict(
                    await stack.fetch(
                        "SELECT CASE WHEN name LIKE 'Pro-%%' THEN 'pro' ELSE 'team' END,"
                        " stripe_price_id FROM plans WHERE plan_id = ANY(%s)",
                        list(plans.values()),
                    )
                )
                async with httpx.AsyncClient(
                    base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30
                ) as api:
                    replica_plans = await make_plans(api, uid, **prices)
                    for t in tenants:
                        r = await api.post("/v1/tenants", json={"tenant_id": t, "name": t})
                        assert r.status_code == 201, r.text
                links = await stack.fetch(
                    "SELECT tenant_id, stripe_customer_id FROM tenants WHERE tenant_id = ANY(%s)",
                    tenants,
                )
                async with pool.connection() as conn:
                    for t, customer in links:
                        await conn.execute(
                            "WITH t AS (UPDATE tenants SET stripe_customer_id = %s"
                            " WHERE tenant_id = %s RETURNING stripe_customer_id, tenant_id)"
                            " INSERT INTO provider_customers SELECT * FROM t",
                            (customer, t),
                        )
                    # stored, never applied: their process died before it could apply them
                    for e in stale:
                        await conn.execute(
                            "INSERT INTO stripe_webhook_events (event_id, type, payload, status,"
                            " attempts, stripe_created_at, received_at)"
                            " VALUES (%s, %s, %s, 'received', 0, %s, %s)",
                            (e["id"], e["type"], Jsonb(e),
                             datetime.fromtimestamp(e["created"], UTC),
                             datetime.now(UTC) - timedelta(hours=1)),
                        )  # fmt: skip

                deliveries = [e for e in events if e["id"] not in stale_ids for _ in range(COPIES)]
                rng.shuffle(deliveries)
                queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
                for e in deliveries:
                    queue.put_nowait(e)
                attempts = 0
                refused: list[int] = []
                halfway = asyncio.Event()

                give_up_at = time.monotonic() + 120 + len(deliveries) / 5

                async def sender() -> None:
                    nonlocal attempts
                    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
                        while not queue.empty():
                            body = json.dumps(queue.get_nowait()).encode()
                            if queue.qsize() <= len(deliveries) // 2:
                                halfway.set()
                            while True:  # like Stripe: again until acknowledged
                                assert time.monotonic() < give_up_at, "deliveries never ended"
                                attempts += 1
                                try:
                                    r = await http.post(
                                        "/webhooks/stripe",
                                        content=body,
                                        headers={"Stripe-Signature": sign(body, secret)},
                                    )
                                except httpx.TransportError:
                                    await asyncio.sleep(0.1)
                                    continue
                                if r.status_code == 200:
                                    break
                                if r.status_code < 500:
                                    refused.append(r.status_code)
                                    break
                                await asyncio.sleep(0.1)

                senders = [asyncio.create_task(sender()) for _ in range(SENDERS)]
                await halfway.wait()
                cp.kill()  # in the middle of the storm
                await asyncio.sleep(0.5)
                cp.start()
                await wait_http(f"{base}/healthz")
                await asyncio.gather(*senders)
                assert refused == []
                # housekeeping applies what was stored and never applied
                deadline = time.monotonic() + 30
                while await f.fetch(
                    pool, "SELECT 1 FROM stripe_webhook_events WHERE status = 'received'"
                ):
                    assert time.monotonic() < deadline, "stored events were never applied"
                    await asyncio.sleep(0.2)
            finally:
                cp.stop()
            stored = await f.fetch(
                pool, "SELECT status, count(*) FROM stripe_webhook_events GROUP BY status"
            )
            assert dict(stored) == {"processed": len(events)}, stored

            async def fetch(sql: str, *args: Any) -> list[tuple[Any, ...]]:
                return await f.fetch(pool, sql, *args)

            stormed = await state(fetch, tenants, {v: k for k, v in replica_plans.items()})
    differing = [t for t in tenants if stormed[t] != in_order[t]]
    assert differing == [], (differing[:3], in_order[differing[0]], stormed[differing[0]])
    grants = sum(len(s["grants"]) for s in in_order.values())
    assert grants >= 2 * n
    report(
        "webhook storm: each event 3 times, shuffled, 16 senders, control plane killed",
        load=len(deliveries) + len(stale),
        load_unit="deliveries",
        faults=1 + len(stale),
        lost=0,
        counted_twice=0,
        applied_twice=sum(
            len(s["grants"]) - len(set(g[2] for g in s["grants"])) for s in stormed.values()
        ),
        notes=f"{n} tenants, {len(events)} events, {attempts} attempts, {grants} grants "
        f"equal to in-order delivery; {len(stale)} stored-never-applied events reclaimed",
    )
