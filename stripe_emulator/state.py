"""The emulator's state and Stripe's behaviour: customers, products, prices, checkout,
subscriptions with proration, invoices, test clocks, and the events they emit."""

from __future__ import annotations

import calendar
import copy
import json
import os
import secrets
import string
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from typing import Any

Obj = dict[str, Any]
API_VERSION = "2025-08-27.basil"
CARDS = {
    "4242424242424242": "ok",
    "4000000000000002": "declined",
    "4000000000000341": "fails_later",  # pays now, fails at renewal
}
TRIAL_WILL_END_SECONDS = 3 * 86_400
_ALPHABET = string.ascii_letters + string.digits


class StripeError(Exception):
    """An error answer in Stripe's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body: Obj = {"error": {"type": type_, "message": message}}
        if code:
            self.body["error"]["code"] = code
        if param:
            self.body["error"]["param"] = param


def _blank(value: Any) -> Any:
    """A template value emptied: keeps the shape of the reference object, none of its data."""
    if isinstance(value, bool):
        return False
    if isinstance(value, list):
        return []
    return None


def _load_templates() -> dict[str, Obj]:
    raw = resources.files("stripe_emulator").joinpath("templates.json").read_text()
    loaded: dict[str, Obj] = json.loads(raw)["resources"]
    return loaded


def _id(prefix: str) -> str:
    return prefix + "_" + "".join(secrets.choice(_ALPHABET) for _ in range(24))


def _months_later(ts: int, months: int) -> int:
    """The same day-of-month `months` later (clamped to the month's end), like Stripe."""
    at = datetime.fromtimestamp(ts, UTC)
    month0 = at.month - 1 + months
    year, month = at.year + month0 // 12, month0 % 12 + 1
    day = min(at.day, calendar.monthrange(year, month)[1])
    return int(at.replace(year=year, month=month, day=day).timestamp())


@dataclass
class Emulator:
    secret_key: str
    base_url: str
    wall_clock: Callable[[], float] = time.time
    objects: dict[str, Obj] = field(default_factory=dict)
    events: list[Obj] = field(default_factory=list)
    idempotency: dict[str, tuple[str, int, Obj]] = field(default_factory=dict)
    # event ids waiting for delivery, in creation order
    on_event: Callable[[Obj], None] = lambda event: None
    cards: dict[str, str] = field(default_factory=dict)  # customer id → card outcome
    templates: dict[str, Obj] = field(default_factory=_load_templates)

    # --- persistence (make run keeps Stripe's state beside the database's) -----------------

    def dump(self, path: str) -> None:
        state = {"objects": self.objects, "events_ids": [e["id"] for e in self.events],
                 "cards": self.cards}  # fmt: skip
        tmp = f"{path}.tmp"
        with open(tmp, "w") as handle:
            json.dump(state, handle)
        os.replace(tmp, path)

    def load(self, path: str) -> None:
        try:
            with open(path) as handle:
                state = json.load(handle)
        except FileNotFoundError:
            return
        self.objects = state["objects"]
        self.events = [self.objects[i] for i in state["events_ids"] if i in self.objects]
        self.cards = state["cards"]

    # --- plumbing --------------------------------------------------------------------------

    def _new(self, kind: str, prefix: str, **values: Any) -> Obj:
        template = self.templates[kind]
        obj = {k: _blank(v) for k, v in template.items()}
        obj.update(object=kind, id=_id(prefix))
        obj.update({k: v for k, v in (("livemode", False), ("metadata", {})) if k in template})
        obj.update(values)
        self.objects[obj["id"]] = obj
        return obj

    def get(self, kind: str, object_id: str, param: str = "id") -> Obj:
        obj = self.objects.get(object_id)
        if obj is None or obj["object"] != kind:
            noun = kind.split(".")[-1].replace("_", " ")
            raise StripeError(
                404, f"No such {noun}: '{object_id}'", code="resource_missing", param=param
            )
        return obj

    def now_for(self, customer_id: str | None) -> int:
        customer = self.objects.get(customer_id or "")
        clock_id = customer.get("test_clock") if customer else None
        if clock_id:
            return int(self.objects[clock_id]["frozen_time"])
        return int(self.wall_clock())

    def emit(self, type_: str, obj: Obj, at: int, previous: Obj | None = None) -> Obj:
        data: Obj = {"object": copy.deepcopy(obj)}
        if previous:
            data["previous_attributes"] = previous
        event = self._new(
            "event",
            "evt",
            type=type_,
            created=at,
            api_version=API_VERSION,
            data=data,
            pending_webhooks=1,
            request={"id": None, "idempotency_key": None},
        )
        self.events.append(event)
        self.on_event(event)
        return event

    def listing(self, items: list[Obj], url: str) -> Obj:
        return {"object": "list", "data": items, "has_more": False, "url": url}

    # --- customers, products, prices -------------------------------------------------------

    def create_customer(self, p: Obj) -> Obj:
        clock = p.get("test_clock")
        if clock:
            self.get("test_helpers.test_clock", clock, "test_clock")
        created = self.now_for(None) if not clock else int(self.objects[clock]["frozen_time"])
        customer = self._new(
            "customer",
            "cus",
            created=created,
            email=p.get("email"),
            name=p.get("name"),
            description=p.get("description"),
            metadata=p.get("metadata") or {},
            test_clock=clock,
            balance=0,
            currency=None,
            delinquent=False,
            invoice_prefix=secrets.token_hex(4).upper(),
            next_invoice_sequence=1,
            preferred_locales=[],
            tax_exempt="none",
            invoice_settings={"default_payment_method": None, "footer": None},
        )
        return customer

    def update_customer(self, customer_id: str, p: Obj) -> Obj:
        customer = self.get("customer", customer_id)
        for key in ("email", "name", "description"):
            if key in p:
                customer[key] = p[key]
        if "metadata" in p:
            customer["metadata"].update(p["metadata"] or {})
        return customer

    def create_product(self, p: Obj) -> Obj:
        if not p.get("name"):
            raise StripeError(400, "Missing required param: name.", param="name")
        return self._new(
            "product",
            "prod",
            name=p["name"],
            description=p.get("description"),
            active=p.get("active", "true") != "false",
            created=self.now_for(None),
            updated=self.now_for(None),
            metadata=p.get("metadata") or {},
            type="service",
            images=[],
            marketing_features=[],
        )

    def create_price(self, p: Obj) -> Obj:
        product = self.get("product", p.get("product", ""), "product")
        try:
            amount = int(p["unit_amount"])
        except (KeyError, ValueError):
            raise StripeError(
                400, "Missing required param: unit_amount.", param="unit_amount"
            ) from None
        recurring = p.get("recurring") or {}
        interval = recurring.get("interval")
        if interval not in ("month", "year"):
            raise StripeError(400, "recurring[interval] must be month or year.", param="recurring")
        return self._new(
            "price",
            "price",
            product=product["id"],
            unit_amount=amount,
            unit_amount_decimal=str(amount),
            currency=p.get("currency", "usd"),
            active=True,
            type="recurring",
            billing_scheme="per_unit",
            recurring={
                "interval": interval,
                "interval_count": 1,
                "meter": None,
                "usage_type": "licensed",
                "trial_period_days": None,
            },
            lookup_key=p.get("lookup_key"),
            nickname=p.get("nickname"),
            metadata=p.get("metadata") or {},
            created=self.now_for(None),
            tax_behavior="unspecified",
        )

    # --- checkout --------------------------------------------------------------------------

    def create_checkout_session(self, p: Obj) -> Obj:
        if p.get("mode") != "subscription":
            raise StripeError(400, "Only mode=subscription is supported here.", param="mode")
        items = p.get("line_items") or []
        if len(items) != 1 or "price" not in items[0]:
            raise StripeError(400, "Pass exactly one line_items[0][price].", param="line_items")
        price = self.get("price", items[0]["price"], "line_items[0][price]")
        if not p.get("success_url"):
            raise StripeError(400, "Missing required param: success_url.", param="success_url")
        customer = p.get("customer")
        if customer:
            self.get("customer", customer, "customer")
        sub_data = p.get("subscription_data") or {}
        trial_days = int(sub_data.get("trial_period_days") or 0)
        now = self.now_for(customer)
        session = self._new(
            "checkout.session",
            "cs_test",
            mode="subscription",
            status="open",
            payment_status="unpaid",
            created=now,
            expires_at=now + 86_400,
            success_url=p["success_url"],
            cancel_url=p.get("cancel_url"),
            client_reference_id=p.get("client_reference_id"),
            customer=customer,
            customer_email=p.get("customer_email"),
            metadata=p.get("metadata") or {},
            currency=price["currency"],
            amount_subtotal=0 if trial_days else price["unit_amount"],
            amount_total=0 if trial_days else price["unit_amount"],
            payment_method_types=["card"],
            subscription=None,
            invoice=None,
            ui_mode="hosted",
        )
        session["url"] = f"{self.base_url}/checkout/pay/{session['id']}"
        # what the page needs later; Stripe keeps it internally too
        session["_line_price"] = price["id"]
        session["_trial_days"] = trial_days
        session["_subscription_metadata"] = sub_data.get("metadata") or {}
        return session

    def pay_checkout(self, session_id: str, card: str) -> str:
        """The hosted page's submit: returns the URL to redirect to."""
        session = self.get("checkout.session", session_id)
        if session["status"] != "open":
            raise StripeError(400, "This Checkout Session is no longer active.")
        outcome = CARDS.get(card.replace(" ", ""))
        if outcome is None:
            raise StripeError(402, "Your card number is incorrect.", type_="card_error",
                              code="incorrect_number")  # fmt: skip
        if outcome == "declined":
            raise StripeError(402, "Your card was declined.", type_="card_error",
                              code="card_declined")  # fmt: skip
        customer_id = session["customer"]
        if not customer_id:
            customer_id = self.create_customer({"email": session["customer_email"]})["id"]
            session["customer"] = customer_id
        self.cards[customer_id] = outcome
        price = self.get("price", session["_line_price"])
        sub = self._start_subscription(
            customer_id, price, session["_trial_days"], session["_subscription_metadata"]
        )
        now = self.now_for(customer_id)
        session.update(
            status="complete",
            payment_status="no_payment_required" if session["_trial_days"] else "paid",
            subscription=sub["id"],
            invoice=sub["latest_invoice"],
            customer_details={"email": session["customer_email"], "name": None},
        )
        self.emit("checkout.session.completed", public(session), now)
        return str(session["success_url"]).replace("{CHECKOUT_SESSION_ID}", session["id"])

    # --- subscriptions and invoices --------------------------------------------------------

    def _period_end(self, price: Obj, start: int) -> int:
        return _months_later(start, 12 if price["recurring"]["interval"] == "year" else 1)

    def _start_subscription(
        self, customer_id: str, price: Obj, trial_days: int, metadata: Obj
    ) -> Obj:
        now = self.now_for(customer_id)
        trial_end = now + trial_days * 86_400 if trial_days else None
        period_end = trial_end or self._period_end(price, now)
        sub = self._new(
            "subscription",
            "sub",
            customer=customer_id,
            status="trialing" if trial_end else "active",
            created=now,
            start_date=now,
            billing_cycle_anchor=period_end if trial_end else now,
            cancel_at_period_end=False,
            cancel_at=None,
            canceled_at=None,
            ended_at=None,
            trial_start=now if trial_end else None,
            trial_end=trial_end,
            currency=price["currency"],
            collection_method="charge_automatically",
            metadata=metadata,
            test_clock=self.objects[customer_id].get("test_clock"),
            default_tax_rates=[],
            discounts=[],
            cancellation_details={"comment": None, "feedback": None, "reason": None},
        )
        item = self._new(
            "subscription_item",
            "si",
            subscription=sub["id"],
            price=copy.deepcopy(public(price)),
            quantity=1,
            created=now,
            current_period_start=now,
            current_period_end=period_end,
            metadata={},
            tax_rates=[],
            discounts=[],
        )
        sub["items"] = self.listing([item], f"/v1/subscription_items?subscription={sub['id']}")
        self.emit("customer.subscription.created", public(sub), now)
        invoice = self._invoice(
            sub, 0 if trial_end else price["unit_amount"], "subscription_create", now, period_end
        )
        self._collect(sub, invoice, now)
        return sub

    def _invoice(self, sub: Obj, amount: int, reason: str, start: int, end: int) -> Obj:
        customer = self.objects[sub["customer"]]
        credit = min(max(-customer["balance"], 0), amount)  # a credit balance pays first
        customer["balance"] += credit
        number = f"{customer['invoice_prefix']}-{customer['next_invoice_sequence']:04d}"
        customer["next_invoice_sequence"] += 1
        invoice = self._new(
            "invoice",
            "in",
            customer=sub["customer"],
            customer_email=customer["email"],
            number=number,
            status="open",
            billing_reason=reason,
            currency=sub["currency"],
            subtotal=amount,
            total=amount,
            amount_due=amount - credit,
            amount_paid=0,
            amount_remaining=amount - credit,
            starting_balance=-credit,
            ending_balance=0,
            attempt_count=0,
            attempted=False,
            auto_advance=True,
            collection_method="charge_automatically",
            created=start,
            effective_at=start,
            period_start=start,
            period_end=end,
            parent={
                "type": "subscription_details",
                "quote_details": None,
                "subscription_details": {"metadata": sub["metadata"], "subscription": sub["id"]},
            },
            lines=self.listing(
                [
                    {
                        "object": "line_item",
                        "id": _id("il"),
                        "amount": amount,
                        "currency": sub["currency"],
                        "description": reason.replace("_", " "),
                        "period": {"start": start, "end": end},
                        "quantity": 1,
                        "pricing": {
                            "type": "price_details",
                            "price_details": {
                                "price": sub["items"]["data"][0]["price"]["id"],
                                "product": sub["items"]["data"][0]["price"]["product"],
                            },
                        },
                    }
                ],
                "/v1/invoices/lines",
            ),
            status_transitions={
                "finalized_at": start,
                "marked_uncollectible_at": None,
                "paid_at": None,
                "voided_at": None,
            },
            hosted_invoice_url=None,
            test_clock=sub.get("test_clock"),
        )
        invoice["hosted_invoice_url"] = f"{self.base_url}/invoices/{invoice['id']}"
        sub["latest_invoice"] = invoice["id"]
        return invoice

    def _collect(
        self, sub: Obj, invoice: Obj, now: int, *, quiet: bool = False, retry: bool = False
    ) -> bool:
        """Charge the customer's card for an open invoice; emit what Stripe emits.
        quiet: a failed charge leaves the subscription's status alone (pending updates).
        A 'fails_later' card (4000 0000 0000 0341) fails renewals only, not a retry by hand."""
        invoice["attempted"] = True
        invoice["attempt_count"] += 1
        card = self.cards.get(sub["customer"], "ok")
        renewal = invoice["billing_reason"] == "subscription_cycle" and not retry
        fails = card == "declined" or (card == "fails_later" and renewal)
        if invoice["amount_due"] > 0 and fails:
            self.emit("invoice.payment_failed", public(invoice), now)
            if not quiet and sub["status"] in ("active", "trialing"):
                previous = {"status": sub["status"]}
                sub["status"] = "past_due"
                self.emit("customer.subscription.updated", public(sub), now, previous)
            return False
        invoice.update(
            status="paid",
            amount_paid=invoice["amount_due"],
            amount_remaining=0,
            status_transitions={**invoice["status_transitions"], "paid_at": now},
        )
        self.emit("invoice.paid", public(invoice), now)
        if sub["status"] in ("past_due", "unpaid"):
            previous = {"status": sub["status"]}
            sub["status"] = "active"
            self.emit("customer.subscription.updated", public(sub), now, previous)
        return True

    def update_subscription(self, sub_id: str, p: Obj) -> Obj:
        sub = self.get("subscription", sub_id)
        if sub["status"] == "canceled":
            raise StripeError(400, "A canceled subscription can only update its metadata.")
        now = self.now_for(sub["customer"])
        previous: Obj = {}
        if "cancel_at_period_end" in p:
            flag = p["cancel_at_period_end"] == "true"
            if flag != sub["cancel_at_period_end"]:
                previous["cancel_at_period_end"] = sub["cancel_at_period_end"]
                sub["cancel_at_period_end"] = flag
                item = sub["items"]["data"][0]
                sub["cancel_at"] = item["current_period_end"] if flag else None
        if "metadata" in p:
            previous["metadata"] = copy.deepcopy(sub["metadata"])
            sub["metadata"].update(p["metadata"] or {})
        items = p.get("items") or []
        if items:
            new_price = self.get("price", items[0].get("price", ""), "items[0][price]")
            item = sub["items"]["data"][0]
            if items[0].get("id") not in (None, item["id"]):
                raise StripeError(400, f"No such subscription item: '{items[0]['id']}'")
            old_price = item["price"]
            if new_price["id"] != old_price["id"]:
                before_items = copy.deepcopy(sub["items"])
                item["price"] = copy.deepcopy(public(new_price))
                paid = self._prorate(sub, old_price, new_price, p.get("proration_behavior"), now)
                if not paid and p.get("payment_behavior") == "pending_if_incomplete":
                    # Stripe keeps the old price until the proration is paid
                    sub["items"] = before_items
                    sub["pending_update"] = {
                        "subscription_items": [{"id": item["id"], "price": new_price["id"]}],
                        "expires_at": now + 23 * 3600,
                    }
                else:
                    previous["items"] = before_items
        if previous:
            self.emit("customer.subscription.updated", public(sub), now, previous)
        return sub

    def _prorate(self, sub: Obj, old: Obj, new: Obj, behavior: str | None, now: int) -> bool:
        """Charge or credit the unused part of the period; False when a charge failed."""
        if behavior == "none" or sub["status"] == "trialing":
            return True
        item = sub["items"]["data"][0]
        start, end = item["current_period_start"], item["current_period_end"]
        left = max(0, end - now)
        amount = (new["unit_amount"] - old["unit_amount"]) * left // max(1, end - start)
        if amount > 0 and behavior == "always_invoice":
            invoice = self._invoice(sub, amount, "subscription_update", now, end)
            if not self._collect(sub, invoice, now, quiet=True):
                invoice["status"] = "void"
                return False
        elif amount < 0:
            self.objects[sub["customer"]]["balance"] += amount  # a credit for the next invoice
        return True

    def preview_invoice(self, p: Obj) -> Obj:
        """POST /v1/invoices/create_preview for a price change of a subscription: with
        `always_invoice`, the proration invoiced now; otherwise the next invoice (the new
        price, less any credit the change leaves). Nothing is stored."""
        sub = self.get("subscription", p.get("subscription", ""), "subscription")
        details = p.get("subscription_details") or {}
        items = details.get("items") or []
        item = sub["items"]["data"][0]
        old = item["price"]
        new = self.get("price", items[0].get("price", ""), "subscription_details[items][0][price]")
        if items[0].get("id") not in (None, item["id"]):
            raise StripeError(400, f"No such subscription item: '{items[0]['id']}'")
        now = self.now_for(sub["customer"])
        start, end = item["current_period_start"], item["current_period_end"]
        prorate = details.get("proration_behavior") != "none" and sub["status"] != "trialing"
        proration = (
            (new["unit_amount"] - old["unit_amount"]) * max(0, end - now) // max(1, end - start)
            if prorate
            else 0
        )
        credit = max(-self.objects[sub["customer"]]["balance"], 0)
        if details.get("proration_behavior") == "always_invoice":
            total, period = proration, (now, end)
        else:  # the next renewal: a new period at the new price, with the credit taken off
            total, period = (
                new["unit_amount"] + min(proration, 0),
                (end, self._period_end(new, end)),
            )
        due = max(0, total - credit)
        preview = {k: _blank(v) for k, v in self.templates["invoice"].items()}
        preview.update(
            object="invoice",
            id="upcoming_" + _id("in"),
            customer=sub["customer"],
            currency=sub["currency"],
            status="draft",
            billing_reason="upcoming",
            subtotal=total,
            total=total,
            amount_due=due,
            amount_remaining=due,
            amount_paid=0,
            created=now,
            period_start=period[0],
            period_end=period[1],
            next_payment_attempt=period[0] if period[0] > now else now,
            livemode=False,
            metadata={},
            lines=self.listing([], "/v1/invoices/upcoming/lines"),
        )
        return preview

    def cancel_subscription(self, sub_id: str) -> Obj:
        sub = self.get("subscription", sub_id)
        if sub["status"] != "canceled":
            now = self.now_for(sub["customer"])
            sub.update(status="canceled", canceled_at=now, ended_at=now)
            self.emit("customer.subscription.deleted", public(sub), now)
        return sub

    def pay_open_invoices(self, customer_id: str, card: str) -> None:
        """The portal's 'update card': a new card, and open invoices retried with it."""
        outcome = CARDS.get(card.replace(" ", ""))
        if outcome is None or outcome == "declined":
            raise StripeError(402, "Your card was declined.", type_="card_error",
                              code="card_declined")  # fmt: skip
        self.cards[customer_id] = outcome
        now = self.now_for(customer_id)
        for invoice in [o for o in list(self.objects.values()) if o["object"] == "invoice"]:
            if invoice["customer"] == customer_id and invoice["status"] == "open":
                sub = self.objects[invoice["parent"]["subscription_details"]["subscription"]]
                self._collect(sub, invoice, now, retry=True)

    # --- test clocks -------------------------------------------------------------------------

    def create_test_clock(self, p: Obj) -> Obj:
        try:
            frozen = int(p["frozen_time"])
        except (KeyError, ValueError):
            raise StripeError(
                400, "Missing required param: frozen_time.", param="frozen_time"
            ) from None
        return self._new(
            "test_helpers.test_clock",
            "clock",
            frozen_time=frozen,
            created=int(self.wall_clock()),
            deletes_after=int(self.wall_clock()) + 30 * 86_400,
            name=p.get("name"),
            status="ready",
            status_details={},
        )

    def advance_test_clock(self, clock_id: str, p: Obj) -> Obj:
        clock = self.get("test_helpers.test_clock", clock_id)
        target = int(p.get("frozen_time", 0))
        if target <= clock["frozen_time"]:
            raise StripeError(400, "The test clock can only move forward.", param="frozen_time")
        subs = [
            o
            for o in self.objects.values()
            if o["object"] == "subscription" and o.get("test_clock") == clock_id
        ]
        # step through every due moment in time order, like the real clock
        while True:
            due = [(self._next_due(s), s) for s in subs if s["status"] != "canceled"]
            ready = [(at, s) for at, s in due if at is not None and at <= target]
            if not ready:
                break
            at, sub = min(ready, key=lambda d: d[0])
            clock["frozen_time"] = at
            self._on_due(sub, at)
        clock["frozen_time"] = target
        return clock

    def _next_due(self, sub: Obj) -> int:
        item = sub["items"]["data"][0]
        if sub["status"] == "trialing" and not sub.get("_trial_warned"):
            return max(int(sub["trial_end"]) - TRIAL_WILL_END_SECONDS, int(sub["created"]))
        return int(item["current_period_end"])

    def _on_due(self, sub: Obj, at: int) -> None:
        item = sub["items"]["data"][0]
        if sub["status"] == "trialing" and not sub.get("_trial_warned"):
            sub["_trial_warned"] = True
            self.emit("customer.subscription.trial_will_end", public(sub), at)
            return
        if sub["cancel_at_period_end"]:
            sub.update(status="canceled", canceled_at=at, ended_at=at)
            self.emit("customer.subscription.deleted", public(sub), at)
            return
        price = item["price"]
        previous = {
            "items": copy.deepcopy(sub["items"]),
            **({"status": "trialing"} if sub["status"] == "trialing" else {}),
        }
        start, end = at, self._period_end(price, at)
        item.update(current_period_start=start, current_period_end=end)
        if sub["status"] == "trialing":
            sub["status"] = "active"
        self.emit("customer.subscription.updated", public(sub), at, previous)
        invoice = self._invoice(sub, price["unit_amount"], "subscription_cycle", start, end)
        self._collect(sub, invoice, at)


def public(obj: Obj) -> Obj:
    """The object as the API shows it (without the emulator's own bookkeeping keys)."""
    return {k: v for k, v in obj.items() if not k.startswith("_")}
