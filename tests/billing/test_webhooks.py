"""POST /webhooks/stripe: only verified events get in; each is applied once; failures are
recorded, answered 500 (so Stripe retries), listed and re-processable."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stripe_emulator.webhooks import sign
from tests.billing.conftest import Stack, pay
from tests.reliability.harness import report, scale


def event(event_id: str, type_: str = "customer.created", **obj: Any) -> dict[str, Any]:
    return {
        "id": event_id,
        "object": "event",
        "type": type_,
        "created": int(time.time()),
        "api_version": "2025-08-27.basil",
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "data": {"object": {"object": "customer", "id": "cus_x", **obj}},
    }


async def count_events(stack: Stack) -> int:
    [(n,)] = await stack.fetch("SELECT count(*) FROM stripe_webhook_events")
    return int(n)


async def post(stack: Stack, body: bytes, signature: str | None) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if signature is not None:
        headers["Stripe-Signature"] = signature
    async with httpx.AsyncClient(base_url=stack.url) as http:
        return await http.post("/webhooks/stripe", content=body, headers=headers)


@pytest.mark.parametrize(
    "case", ["missing", "garbage", "wrong-secret", "stale", "tampered-body", "not-json"]
)
async def test_unverifiable_webhooks_are_rejected_and_nothing_is_written(
    stack: Stack, uid: str, case: str
) -> None:
    body = json.dumps(event(f"evt_bad_{uid}")).encode()
    secret = stack.settings.stripe_webhook_secret
    signature: str | None
    match case:
        case "missing":
            signature = None
        case "garbage":
            signature = "t=1,v1=abc"
        case "wrong-secret":
            signature = sign(body, "whsec_somebody_else")
        case "stale":
            signature = sign(body, secret, timestamp=int(time.time()) - 600)
        case "tampered-body":
            signature = sign(body, secret)
            body = body.replace(b"customer.created", b"invoice.paid")
        case _:
            body = b"{not json"
            signature = sign(body, secret)
    before = await count_events(stack)
    r = await post(stack, body, signature)
    assert r.status_code == 400, r.text
    assert r.json()["type"] == "/problems/invalid-webhook"
    assert await count_events(stack) == before


async def test_an_oversized_body_is_refused_before_it_is_read_whole(stack: Stack) -> None:
    body = b'{"id": "evt_big", "pad": "' + b"x" * (600 * 1024) + b'"}'
    before = await count_events(stack)
    r = await post(stack, body, sign(body, stack.settings.stripe_webhook_secret))
    assert r.status_code == 413 and r.json()["type"] == "/problems/webhook-too-large"
    async with httpx.AsyncClient(base_url=stack.url) as http:  # no length declared: streamed

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(10):
                yield b"x" * 65536

        r = await http.post(
            "/webhooks/stripe", content=chunks(), headers={"Stripe-Signature": "t=1"}
        )
    assert r.status_code == 413
    assert await count_events(stack) == before


@pytest.fixture(scope="module")
def tally() -> Iterator[dict[str, int]]:
    """Bad bodies tried, for `make reliability`'s table."""
    counts = {"tried": 0}
    yield counts
    report(
        "webhook endpoint fuzzing: random bodies, signatures, sizes",
        bad_inputs=counts["tried"],
        lost=0,
        counted_twice=0,
        applied_twice=0,
        notes="all answered 400 (413 beyond 512 KiB), nothing stored",
    )


@settings(
    max_examples=60 * scale(),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    body=st.one_of(st.binary(max_size=2048), st.text(max_size=512).map(str.encode)),
    signature=st.one_of(st.none(), st.text(max_size=200), st.just("t=1,v1=00")),
    signed=st.booleans(),
)
async def test_random_bodies_and_signatures_are_refused_and_nothing_is_stored(
    stack: Stack, tally: dict[str, int], body: bytes, signature: str | None, signed: bool
) -> None:
    tally["tried"] += 1
    if signed:  # a right signature on a body that is no event
        signature = sign(body, stack.settings.stripe_webhook_secret)
    if signature is not None and not all(32 <= ord(c) < 127 for c in signature):
        signature = None  # not sendable as a header
    elif signature is not None:
        signature = signature.strip()  # h11 sends no value with surrounding spaces
    before = await count_events(stack)
    r = await post(stack, body, signature)
    assert r.status_code == 400, (body[:80], signature, r.text)
    assert await count_events(stack) == before


async def test_duplicates_are_acknowledged_once_and_unknown_types_are_stored(
    stack: Stack, uid: str
) -> None:
    body = json.dumps(event(f"evt_dup_{uid}", "customer.created")).encode()
    secret = stack.settings.stripe_webhook_secret
    first = await post(stack, body, sign(body, secret))
    again = await post(stack, body, sign(body, secret))
    assert first.status_code == again.status_code == 200
    assert first.json() == {"event_id": f"evt_dup_{uid}", "status": "ignored", "duplicate": False}
    assert again.json()["duplicate"] is True
    rows = await stack.fetch(
        "SELECT status, attempts FROM stripe_webhook_events WHERE event_id = %s", f"evt_dup_{uid}"
    )
    assert rows == [("ignored", 1)]


async def test_a_failing_event_is_recorded_answered_500_and_can_be_reprocessed(
    stack: Stack, uid: str
) -> None:
    async with stack.api() as api:
        plan = (
            await api.post("/v1/plans", json={"name": f"fail-{uid}", "price_cents": 900})
        ).json()
        await api.post("/v1/tenants", json={"tenant_id": f"f-{uid}", "name": "F"})
        r = await api.post(
            f"/v1/tenants/f-{uid}/checkout-sessions", json={"plan_id": plan["plan_id"]}
        )
        assert r.status_code == 201, r.text
        # deliveries held back: the events are applied by hand below
        await stack.webhooks(paused=True)
        try:
            await pay(r.json()["url"])
            emulator = stack.emulator_app.state.emulator
            created = next(
                e for e in reversed(emulator.events) if e["type"] == "customer.subscription.created"
            )
            # the plan loses its Stripe price: the event cannot be mapped to a plan
            [(price_id,)] = await stack.fetch(
                "DELETE FROM plan_stripe_prices WHERE plan_id = %s RETURNING stripe_price_id",
                plan["plan_id"],
            )
            body = json.dumps(created).encode()
            r = await post(stack, body, sign(body, stack.settings.stripe_webhook_secret))
            assert r.status_code == 500
            failed = (await api.get("/v1/webhook-events", params={"status": "failed"})).json()
            [row] = [e for e in failed["items"] if e["event_id"] == created["id"]]
            assert row["attempts"] == 1 and "no plan sells" in row["last_error"]
            # counted, and told to the tenant it concerns (once)
            async with httpx.AsyncClient(base_url=stack.url) as http:
                metrics = (await http.get("/metrics")).text
            assert 'billing_webhook_events_failed_total{type="customer.subscription.created"}' in (
                metrics
            )
            notes = (await api.get(f"/v1/tenants/f-{uid}/notifications")).json()["items"]
            assert [n["kind"] for n in notes] == ["billing_event_failed"]
            assert (await api.get(f"/v1/tenants/f-{uid}/subscription")).json()["status"] == "none"
            # the operator fixes the mapping and re-processes
            await stack.fetch(
                "INSERT INTO plan_stripe_prices (stripe_price_id, plan_id) VALUES (%s, %s)"
                " RETURNING 1",
                price_id,
                plan["plan_id"],
            )
            r = await api.post(f"/v1/webhook-events/{created['id']}/reprocess")
            assert r.status_code == 200 and r.json()["status"] == "processed"
            assert r.json()["attempts"] == 2 and r.json()["last_error"] is None
            sub = (await api.get(f"/v1/tenants/f-{uid}/subscription")).json()
            assert sub["status"] == "active" and sub["plan_id"] == plan["plan_id"]
            r = await api.post("/v1/webhook-events/evt_nope/reprocess")
            assert r.status_code == 404
        finally:
            await stack.webhooks(paused=False)
        await stack.settle()


async def test_the_success_page_activates_nothing(stack: Stack, uid: str) -> None:
    async with stack.api() as api:
        plan = (await api.post("/v1/plans", json={"name": f"ok-{uid}", "price_cents": 700})).json()
        await api.post("/v1/tenants", json={"tenant_id": f"s-{uid}", "name": "S"})
        r = await api.post(
            f"/v1/tenants/s-{uid}/checkout-sessions", json={"plan_id": plan["plan_id"]}
        )
        await stack.webhooks(paused=True)
        try:
            paid = await pay(r.json()["url"])
            async with httpx.AsyncClient() as browser:
                page = await browser.get(paid.headers["location"])
                forged = await browser.get(
                    f"{stack.url}/billing/return?tenant=s-{uid}&session_id=cs_forged&status=paid"
                )
            assert "activating" in page.text and "activating" in forged.text
            # paid at Stripe, but nothing here until the verified webhook arrives
            sub = (await api.get(f"/v1/tenants/s-{uid}/subscription")).json()
            assert sub["status"] == "none"
        finally:
            await stack.webhooks(paused=False)
        await stack.settle()
        sub = (await api.get(f"/v1/tenants/s-{uid}/subscription")).json()
        assert sub["status"] == "active" and sub["plan_id"] == plan["plan_id"]


async def test_live_delivery_with_duplicates_out_of_order_applies_once(
    stack: Stack, uid: str
) -> None:
    t = f"dup-{uid}"
    async with stack.api() as api:
        plan = (
            await api.post(
                "/v1/plans",
                json={
                    "name": f"dup-{uid}",
                    "price_cents": 1200,
                    "wallet_grants": [{"on": "start", "amount_micros": 700}],
                },
            )
        ).json()
        await api.post("/v1/tenants", json={"tenant_id": t, "name": "D"})
        r = await api.post(f"/v1/tenants/{t}/checkout-sessions", json={"plan_id": plan["plan_id"]})
        await stack.webhooks(copies=3, shuffle=True)
        try:
            await pay(r.json()["url"])
            await stack.settle()
        finally:
            await stack.webhooks(copies=1, shuffle=False)
        sub = (await api.get(f"/v1/tenants/{t}/subscription")).json()
        assert sub["status"] == "active" and sub["plan_id"] == plan["plan_id"]
        wallet = (await api.get(f"/v1/tenants/{t}/wallet")).json()
        assert wallet["balance_micros"] == 700 and len(wallet["grants"]) == 1
        rows = await stack.fetch("SELECT count(*) FROM subscriptions WHERE tenant_id = %s", t)
        assert rows == [(1,)]
