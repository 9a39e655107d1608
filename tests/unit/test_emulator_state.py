"""The local Stripe keeps its objects across restarts when given a state file."""

from __future__ import annotations

from pathlib import Path

import pytest

from stripe_emulator.forms import decode
from stripe_emulator.state import Emulator, StripeError


def test_state_survives_a_restart(tmp_path: Path) -> None:
    first = Emulator(secret_key="sk", base_url="http://x", wall_clock=lambda: 1_700_000_000)
    customer = first.create_customer({"email": "a@example.com"})
    product = first.create_product({"name": "Pro"})
    price = first.create_price(
        {"product": product["id"], "unit_amount": "900", "recurring": {"interval": "month"}}
    )
    first.emit("customer.created", customer, 1_700_000_000)
    path = str(tmp_path / "stripe.json")
    first.dump(path)
    again = Emulator(secret_key="sk", base_url="http://x")
    again.load(path)
    assert again.get("customer", customer["id"])["email"] == "a@example.com"
    assert again.get("price", price["id"])["unit_amount"] == 900
    assert [e["type"] for e in again.events] == ["customer.created"]
    fresh = Emulator(secret_key="sk", base_url="http://x")
    fresh.load(str(tmp_path / "missing.json"))  # nothing saved yet: starts empty
    with pytest.raises(StripeError) as caught:
        fresh.get("customer", customer["id"])
    assert caught.value.status == 404
    assert caught.value.body["error"]["code"] == "resource_missing"


def test_stripe_form_encoding_nests_dicts_and_lists() -> None:
    body = (
        "mode=subscription&line_items[0][price]=price_1&line_items[0][quantity]=1"
        "&metadata[tenant_id]=acme&expand[]=subscription&expand[]=customer"
    )
    assert decode(body) == {
        "mode": "subscription",
        "line_items": [{"price": "price_1", "quantity": "1"}],
        "metadata": {"tenant_id": "acme"},
        "expand": ["subscription", "customer"],
    }
