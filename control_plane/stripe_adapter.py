"""The BillingAdapter on Stripe: the official SDK (StripeClient, async over httpx), the one
module that imports `stripe`. It points at the local emulator unless STRIPE_SECRET_KEY is set.
Everything it returns is billing_core's own types."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import stripe
from stripe.params import CustomerCreateParams
from stripe.params.checkout import SessionCreateParamsSubscriptionData

from billing_core.billing.provider import (
    BillingEvent,
    ChangePreview,
    EventKind,
    InvalidSignature,
    PriceRef,
    ProviderInvoice,
    ProviderSubscription,
    SessionLink,
)
from billing_core.errors import Conflict, InvalidRequest, NotFound, Unavailable
from billing_core.settings import Settings

WEBHOOK_TOLERANCE_SECONDS = 300


def _at(value: Any) -> datetime | None:
    return None if value in (None, 0) else datetime.fromtimestamp(int(value), UTC)


def _dict(obj: Any) -> dict[str, Any]:
    converted: dict[str, Any] = obj.to_dict() if hasattr(obj, "to_dict") else dict(obj)
    return converted


def subscription_from(data: Mapping[str, Any]) -> ProviderSubscription:
    item = data["items"]["data"][0]
    return ProviderSubscription(
        subscription_id=data["id"],
        customer_id=data["customer"],
        status=data["status"],
        price_id=item["price"]["id"],
        item_id=item["id"],
        # newer API versions keep the period on the item, older ones on the subscription
        current_period_start=_at(
            item.get("current_period_start") or data.get("current_period_start")
        ),
        current_period_end=_at(item.get("current_period_end") or data.get("current_period_end")),
        billing_cycle_anchor=_at(data.get("billing_cycle_anchor")),
        trial_start=_at(data.get("trial_start")),
        trial_end=_at(data.get("trial_end")),
        cancel_at_period_end=bool(data.get("cancel_at_period_end")),
        canceled_at=_at(data.get("canceled_at")),
        metadata=dict(data.get("metadata") or {}),
    )


def _invoice_subscription(data: Mapping[str, Any]) -> str | None:
    parent = data.get("parent") or {}
    details = parent.get("subscription_details") or {}
    found = details.get("subscription") or data.get("subscription")
    return str(found) if found else None


def _invoice_price(data: Mapping[str, Any]) -> str | None:
    lines = (data.get("lines") or {}).get("data") or []
    if not lines:
        return None
    line = lines[0]
    details = (line.get("pricing") or {}).get("price_details") or {}
    price = details.get("price") or line.get("price")
    if isinstance(price, Mapping):
        price = price.get("id")
    return str(price) if price else None


def invoice_from(data: Mapping[str, Any]) -> ProviderInvoice:
    return ProviderInvoice(
        invoice_id=data["id"],
        subscription_id=_invoice_subscription(data),
        customer_id=data["customer"],
        billing_reason=data.get("billing_reason") or "",
        status=data.get("status") or "",
        amount_paid_cents=int(data.get("amount_paid") or 0),
        amount_due_cents=int(data.get("amount_due") or 0),
        price_id=_invoice_price(data),
        period_start=_at(data.get("period_start")),
        period_end=_at(data.get("period_end")),
        number=data.get("number") or "",
        currency=data.get("currency") or "usd",
        total_cents=int(data.get("total") or 0),
        created=_at(data.get("created")),
        hosted_url=data.get("hosted_invoice_url"),
    )


# Stripe's event types the platform acts on; every other one is stored and ignored
EVENT_KINDS = {
    "checkout.session.completed": EventKind.CHECKOUT_COMPLETED,
    "customer.subscription.created": EventKind.SUBSCRIPTION_CHANGED,
    "customer.subscription.updated": EventKind.SUBSCRIPTION_CHANGED,
    "customer.subscription.deleted": EventKind.SUBSCRIPTION_ENDED,
    "customer.subscription.trial_will_end": EventKind.TRIAL_ENDING,
    "invoice.paid": EventKind.INVOICE_PAID,
    "invoice.payment_failed": EventKind.PAYMENT_FAILED,
}


def event_from(payload: Mapping[str, Any]) -> BillingEvent:
    try:
        obj = payload["data"]["object"]
        kind = obj.get("object")
        subscription_id: str | None = None
        invoice = None
        if kind == "subscription":
            subscription_id = obj["id"]
        elif kind == "checkout.session":
            subscription_id = obj.get("subscription")
        elif kind == "invoice":
            invoice = invoice_from(obj)
            subscription_id = invoice.subscription_id
        customer = obj.get("customer")
        return BillingEvent(
            event_id=str(payload["id"]),
            type=str(payload["type"]),
            kind=EVENT_KINDS.get(str(payload["type"]), EventKind.OTHER),
            created=datetime.fromtimestamp(int(payload["created"]), UTC),
            customer_id=customer if isinstance(customer, str) else None,
            subscription_id=subscription_id,
            client_reference_id=obj.get("client_reference_id")
            if kind == "checkout.session"
            else None,
            metadata=dict(obj.get("metadata") or {}),
            invoice=invoice,
            payload=payload,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InvalidSignature(f"not a Stripe event: {type(exc).__name__}: {exc}") from None


class StripeBillingAdapter:
    def __init__(self, settings: Settings) -> None:
        base = settings.stripe_api_base
        self._http = stripe.HTTPXClient()
        self._client = stripe.StripeClient(
            settings.stripe_api_key,
            base_addresses={"api": base} if base else None,
            http_client=self._http,
            max_network_retries=2,
        )
        self._webhook_secret = settings.stripe_webhook_secret

    async def aclose(self) -> None:
        await self._http.close_async()  # type: ignore[no-untyped-call]
        self._http.close()  # type: ignore[no-untyped-call]

    async def _call(self, what: str, coro: Any) -> Any:
        """One place that turns Stripe's errors into the domain's."""
        try:
            return await coro
        except stripe.InvalidRequestError as exc:
            if exc.http_status == 404:
                raise NotFound(f"{what}: {exc.user_message or exc}") from None
            raise InvalidRequest(f"{what}: {exc.user_message or exc}") from None
        except stripe.CardError as exc:
            raise Conflict(f"{what}: {exc.user_message or exc}") from None
        except stripe.StripeError as exc:
            raise Unavailable(
                f"{what}: the payment provider failed ({type(exc).__name__})"
            ) from None

    async def _still_there(self, what: str, coro: Any) -> bool:
        try:
            found = await self._call(what, coro)
        except NotFound:
            return False
        data = _dict(found)
        return not data.get("deleted") and data.get("active", True) is not False

    async def ensure_customer(
        self, tenant_id: str, email: str, name: str, existing: str | None
    ) -> str:
        if existing and await self._still_there(
            "fetch customer", self._client.v1.customers.retrieve_async(existing)
        ):
            return existing
        params: CustomerCreateParams = {"name": name, "metadata": {"tenant_id": tenant_id}}
        if email:
            params["email"] = email
        customer = await self._call(
            "create customer",
            self._client.v1.customers.create_async(
                params=params,
                # a replacement (the old one was deleted at Stripe) needs a key of its own
                options={"idempotency_key": f"customer-{tenant_id}-{existing or 'first'}"},
            ),
        )
        return str(customer.id)

    async def ensure_price(
        self,
        plan_id: str,
        name: str,
        price_cents: int,
        currency: str,
        interval: str,
        existing: PriceRef | None,
    ) -> PriceRef:
        if existing is not None and await self._still_there(
            "fetch price", self._client.v1.prices.retrieve_async(existing.price_id)
        ):
            return existing
        key = f"plan-{plan_id}-{price_cents}-{currency}-{interval}-{existing or 'first'}"
        product = await self._call(
            "create product",
            self._client.v1.products.create_async(
                params={"name": name, "metadata": {"plan_id": plan_id}},
                options={"idempotency_key": f"{key}-product"},
            ),
        )
        price = await self._call(
            "create price",
            self._client.v1.prices.create_async(
                params={
                    "product": product.id,
                    "unit_amount": price_cents,
                    "currency": currency,
                    "recurring": {"interval": interval},
                    "metadata": {"plan_id": plan_id},
                },
                options={"idempotency_key": f"{key}-price"},
            ),
        )
        return PriceRef(str(product.id), str(price.id))

    async def create_checkout_session(
        self,
        *,
        tenant_id: str,
        customer_id: str,
        price_id: str,
        trial_days: int,
        success_url: str,
        cancel_url: str,
        idempotency_key: str,
    ) -> SessionLink:
        subscription_data: SessionCreateParamsSubscriptionData = {
            "metadata": {"tenant_id": tenant_id}
        }
        if trial_days:
            subscription_data["trial_period_days"] = trial_days
        session = await self._call(
            "create checkout session",
            self._client.v1.checkout.sessions.create_async(
                params={
                    "mode": "subscription",
                    "customer": customer_id,
                    "client_reference_id": tenant_id,
                    "line_items": [{"price": price_id, "quantity": 1}],
                    "success_url": success_url,
                    "cancel_url": cancel_url,
                    "metadata": {"tenant_id": tenant_id},
                    "subscription_data": subscription_data,
                },
                options={"idempotency_key": idempotency_key},
            ),
        )
        return SessionLink(str(session.id), str(session.url))

    async def create_portal_session(self, customer_id: str, return_url: str) -> SessionLink:
        session = await self._call(
            "create portal session",
            self._client.v1.billing_portal.sessions.create_async(
                params={"customer": customer_id, "return_url": return_url}
            ),
        )
        return SessionLink(str(session.id), str(session.url))

    async def fetch_subscription(self, subscription_id: str) -> ProviderSubscription:
        sub = await self._call(
            "fetch subscription", self._client.v1.subscriptions.retrieve_async(subscription_id)
        )
        return subscription_from(_dict(sub))

    async def change_price(
        self, subscription_id: str, item_id: str, price_id: str, *, upgrade: bool
    ) -> ProviderSubscription:
        # an upgrade is invoiced and paid now; a downgrade leaves a credit for the next invoice
        sub = await self._call(
            "change subscription",
            self._client.v1.subscriptions.update_async(
                subscription_id,
                params={
                    "items": [{"id": item_id, "price": price_id}],
                    "proration_behavior": "always_invoice" if upgrade else "create_prorations",
                    # an upgrade takes effect only once its proration is paid
                    "payment_behavior": "pending_if_incomplete" if upgrade else "allow_incomplete",
                },
            ),
        )
        return subscription_from(_dict(sub))

    async def cancel_at_period_end(
        self, subscription_id: str, cancel: bool
    ) -> ProviderSubscription:
        sub = await self._call(
            "cancel subscription",
            self._client.v1.subscriptions.update_async(
                subscription_id, params={"cancel_at_period_end": cancel}
            ),
        )
        return subscription_from(_dict(sub))

    async def preview_change(
        self, subscription_id: str, item_id: str, price_id: str, *, upgrade: bool
    ) -> ChangePreview:
        async def preview(behavior: str) -> dict[str, Any]:
            invoice = await self._call(
                "preview invoice",
                self._client.v1.invoices.create_preview_async(
                    params={
                        "subscription": subscription_id,
                        "subscription_details": {
                            "items": [{"id": item_id, "price": price_id}],
                            "proration_behavior": behavior,
                        },
                    }
                ),
            )
            return _dict(invoice)

        # an upgrade is invoiced at once (its proration); a downgrade's credit goes to the
        # next invoice
        now = await preview("always_invoice") if upgrade else None
        upcoming = await preview("create_prorations")
        price = await self._call("fetch price", self._client.v1.prices.retrieve_async(price_id))
        return ChangePreview(
            currency=str(upcoming.get("currency") or "usd"),
            due_today_cents=int(now["amount_due"]) if now else 0,
            next_invoice_cents=int(upcoming["amount_due"])
            if not upgrade
            else int(price.unit_amount or 0),
            next_invoice_at=_at(upcoming.get("next_payment_attempt") or upcoming.get("period_end")),
        )

    async def list_invoices(self, customer_id: str, limit: int = 12) -> list[ProviderInvoice]:
        found = await self._call(
            "list invoices",
            self._client.v1.invoices.list_async(params={"customer": customer_id, "limit": limit}),
        )
        return [invoice_from(_dict(i)) for i in found.data]

    def parse_webhook(self, payload: bytes, signature: str) -> BillingEvent:
        if not self._webhook_secret:
            raise InvalidSignature("STRIPE_WEBHOOK_SECRET is not set: webhooks cannot be verified")
        try:
            text = payload.decode("utf-8")
            stripe.WebhookSignature.verify_header(
                text, signature, self._webhook_secret, tolerance=WEBHOOK_TOLERANCE_SECONDS
            )
        except UnicodeDecodeError:
            raise InvalidSignature("the body is not UTF-8 text") from None
        except stripe.SignatureVerificationError as exc:
            raise InvalidSignature(str(exc.user_message or exc)) from None
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise InvalidSignature(f"the body is not JSON: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("data"), dict):
            raise InvalidSignature("the body is not a Stripe event")
        return event_from(data)

    def parse_stored_event(self, payload: Mapping[str, Any]) -> BillingEvent:
        return event_from(payload)
