"""The SDK-to-emulator contract: the Stripe adapter's calls succeed against the local Stripe,
and what the emulator returns has the shape of Stripe's own reference objects.

The same adapter tests run against real Stripe test mode when STRIPE_SECRET_KEY is set."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from billing_core.billing.provider import InvalidSignature
from billing_core.errors import NotFound
from billing_core.settings import Settings
from control_plane.stripe_adapter import StripeBillingAdapter
from stripe_emulator.webhooks import sign
from tests.billing.conftest import EMULATOR_KEY, Stack, pay

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "stripe_emulator" / "templates.json"
# Stripe's own fixtures3.json, where this workplace keeps it (beside the checkout, or fixed)
REFERENCE = next(
    (
        path
        for path in (
            Path(os.environ.get("STRIPE_FIXTURES", "/nonexistent")),
            ROOT.parent / "shared" / "stripe" / "fixtures3.json",
            Path("/work/shared/stripe/fixtures3.json"),
        )
        if path.exists()
    ),
    ROOT.parent / "shared" / "stripe" / "fixtures3.json",
)
REAL_KEY = os.environ.get("STRIPE_SECRET_KEY", "")


@contextlib.asynccontextmanager
async def opened(settings: Settings) -> AsyncIterator[StripeBillingAdapter]:
    adapter = StripeBillingAdapter(settings)
    try:
        yield adapter
    finally:
        await adapter.aclose()


@pytest.fixture(params=["emulator", "stripe-test-mode"])
async def adapter(
    request: pytest.FixtureRequest, stack: Stack
) -> AsyncIterator[StripeBillingAdapter]:
    if request.param == "emulator":
        settings = stack.settings
    elif REAL_KEY.startswith("sk_test_"):
        settings = Settings(stripe_secret_key=REAL_KEY, stripe_webhook_secret="whsec_" + "0" * 32)
    else:
        pytest.skip("set STRIPE_SECRET_KEY=sk_test_… to run against Stripe's test mode")
    async with opened(settings) as adapter:
        yield adapter


async def test_customer_price_checkout_and_portal(adapter: StripeBillingAdapter) -> None:
    tag = secrets.token_hex(4)
    customer = await adapter.ensure_customer(f"contract-{tag}", "owner@example.com", "Owner", None)
    assert customer.startswith("cus_")
    assert await adapter.ensure_customer(f"contract-{tag}", "", "", customer) == customer
    replaced = await adapter.ensure_customer(f"contract-{tag}", "", "Owner", "cus_deleted")
    assert replaced.startswith("cus_") and replaced != customer
    price = await adapter.ensure_price(f"plan-{tag}", "Contract", 1234, "usd", "month", None)
    assert price.price_id.startswith("price_") and price.product_id.startswith("prod_")
    assert (
        await adapter.ensure_price(f"plan-{tag}", "Contract", 1234, "usd", "month", price) == price
    )
    link = await adapter.create_checkout_session(
        tenant_id=f"contract-{tag}",
        customer_id=customer,
        price_id=price.price_id,
        trial_days=7,
        success_url="http://127.0.0.1/ok?session_id={CHECKOUT_SESSION_ID}",
        cancel_url="http://127.0.0.1/cancel",
        idempotency_key=f"contract-{tag}",
    )
    assert link.session_id.startswith("cs_") and link.url.startswith("http")
    again = await adapter.create_checkout_session(
        tenant_id=f"contract-{tag}",
        customer_id=customer,
        price_id=price.price_id,
        trial_days=7,
        success_url="http://127.0.0.1/ok?session_id={CHECKOUT_SESSION_ID}",
        cancel_url="http://127.0.0.1/cancel",
        idempotency_key=f"contract-{tag}",
    )
    assert again == link  # the Idempotency-Key is honoured
    with pytest.raises(NotFound):
        await adapter.fetch_subscription("sub_does_not_exist")


async def test_subscription_fetch_change_and_cancel_on_the_emulator(stack: Stack) -> None:
    async with opened(stack.settings) as adapter:
        await _subscription_round_trip(stack, adapter)


async def _subscription_round_trip(stack: Stack, adapter: StripeBillingAdapter) -> None:
    tag = secrets.token_hex(4)
    customer = await adapter.ensure_customer(f"c-{tag}", "", "C", None)
    small = await adapter.ensure_price(f"s-{tag}", "Small", 1000, "usd", "month", None)
    large = await adapter.ensure_price(f"l-{tag}", "Large", 3000, "usd", "month", None)
    link = await adapter.create_checkout_session(
        tenant_id=f"c-{tag}", customer_id=customer, price_id=small.price_id, trial_days=0,
        success_url="http://127.0.0.1/ok", cancel_url="http://127.0.0.1/no",
        idempotency_key=f"c-{tag}",
    )  # fmt: skip
    await stack.webhooks(paused=True)  # this customer belongs to no tenant here
    try:
        assert (await pay(link.url)).status_code == 303
        emulator = stack.emulator_app.state.emulator
        session = emulator.objects[link.session_id]
        sub = await adapter.fetch_subscription(session["subscription"])
        assert (sub.status, sub.price_id, sub.customer_id) == ("active", small.price_id, customer)
        assert sub.current_period_end and sub.current_period_start
        assert sub.current_period_end > sub.current_period_start
        up = await adapter.change_price(
            sub.subscription_id, sub.item_id, large.price_id, upgrade=True
        )
        assert up.price_id == large.price_id
        invoices = [
            o for o in emulator.objects.values()
            if o["object"] == "invoice" and o["customer"] == customer
        ]  # fmt: skip
        reasons = sorted(i["billing_reason"] for i in invoices)
        assert reasons == ["subscription_create", "subscription_update"]
        proration = next(i for i in invoices if i["billing_reason"] == "subscription_update")
        assert 0 < proration["amount_paid"] <= 2000  # the unused part of the month, prorated
        down = await adapter.change_price(sub.subscription_id, sub.item_id, small.price_id,
                                          upgrade=False)  # fmt: skip
        assert down.price_id == small.price_id
        assert emulator.objects[customer]["balance"] < 0  # a credit for the next invoice
        ending = await adapter.cancel_at_period_end(sub.subscription_id, True)
        assert ending.cancel_at_period_end and ending.status == "active"
        portal = await adapter.create_portal_session(customer, "http://127.0.0.1/back")
        assert portal.url.startswith(stack.emulator_url)
    finally:
        # these events name no tenant of the control plane: they go nowhere
        await stack.webhooks(discard=True, paused=False)


async def test_webhook_parsing_verifies_like_stripe(stack: Stack) -> None:
    async with (
        opened(stack.settings) as adapter,
        opened(Settings(stripe_emulator_key=EMULATOR_KEY)) as unsigned,
    ):
        _parse(stack, adapter, unsigned)


def _parse(stack: Stack, adapter: StripeBillingAdapter, unsigned: StripeBillingAdapter) -> None:
    payload = {
        "id": "evt_contract",
        "object": "event",
        "type": "invoice.paid",
        "created": int(time.time()),
        "data": {
            "object": {
                "object": "invoice",
                "id": "in_1",
                "customer": "cus_1",
                "billing_reason": "subscription_cycle",
                "status": "paid",
                "amount_paid": 2000,
                "amount_due": 2000,
                "period_start": 1_700_000_000,
                "period_end": 1_702_600_000,
                "parent": {"subscription_details": {"subscription": "sub_1"}},
                "lines": {"data": [{"pricing": {"price_details": {"price": "price_1"}}}]},
            }
        },
    }
    body = json.dumps(payload).encode()
    event = adapter.parse_webhook(body, sign(body, stack.settings.stripe_webhook_secret))
    assert (event.event_id, event.subscription_id, event.customer_id) == (
        "evt_contract",
        "sub_1",
        "cus_1",
    )
    assert event.invoice is not None and event.invoice.price_id == "price_1"
    assert event.invoice.amount_paid_cents == 2000
    with pytest.raises(InvalidSignature):
        adapter.parse_webhook(body, sign(body, "whsec_other"))
    with pytest.raises(InvalidSignature, match="STRIPE_WEBHOOK_SECRET"):
        unsigned.parse_webhook(body, sign(body, "whsec_other"))


def _templates() -> dict[str, dict[str, Any]]:
    loaded: dict[str, dict[str, Any]] = json.loads(TEMPLATES.read_text())["resources"]
    return loaded


def test_templates_are_stripe_reference_objects_unchanged() -> None:
    if not REFERENCE.exists():
        pytest.skip(f"{REFERENCE} is not on this machine")
    reference = json.loads(REFERENCE.read_text())["resources"]
    for kind, obj in _templates().items():
        assert obj == reference[kind], kind


async def test_emulator_objects_have_the_reference_shape(stack: Stack) -> None:
    """Everything the emulator made in this module's tests: same top-level fields as
    Stripe's reference object of that type, and the ones the adapter reads are filled."""
    templates = _templates()
    made = list(stack.emulator_app.state.emulator.objects.values())
    kinds = {o["object"] for o in made}
    assert {"customer", "product", "price", "checkout.session", "subscription", "invoice",
            "event"} <= kinds  # fmt: skip
    for obj in made:
        public = {k for k in obj if not k.startswith("_")}
        expected = set(templates[obj["object"]])
        assert (
            public == expected | {"url"}
            if obj["object"] == "checkout.session"
            else (public == expected)
        ), (obj["object"], sorted(public ^ expected))
    read_by_adapter = {
        "subscription": ["id", "customer", "status", "items", "billing_cycle_anchor",
                         "trial_start", "trial_end", "cancel_at_period_end", "canceled_at",
                         "metadata"],
        "invoice": ["id", "customer", "billing_reason", "status", "amount_paid", "amount_due",
                    "lines", "period_start", "period_end", "parent"],
        "checkout.session": ["id", "url", "subscription", "customer", "client_reference_id"],
        "event": ["id", "type", "created", "data"],
    }  # fmt: skip
    for kind, fields in read_by_adapter.items():
        for name in fields:
            assert name in templates[kind], (kind, name)
        sample = next(o for o in made if o["object"] == kind)
        for name in fields:
            assert name in sample, (kind, name)
    item = next(o for o in made if o["object"] == "subscription")["items"]["data"][0]
    for name in ("id", "price", "current_period_start", "current_period_end"):
        assert name in templates["subscription_item"] and item[name] is not None
