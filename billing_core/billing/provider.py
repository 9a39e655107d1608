"""The payment provider as the domain sees it: a BillingAdapter Protocol and our own data
types. No provider object crosses this line (the Stripe implementation lives in
control_plane/stripe_adapter.py, the only module that imports `stripe`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol


class InvalidSignature(Exception):
    """A webhook whose signature, timestamp or body cannot be trusted."""


@dataclass(frozen=True, slots=True)
class PriceRef:
    product_id: str
    price_id: str


@dataclass(frozen=True, slots=True)
class SessionLink:
    session_id: str
    url: str


@dataclass(frozen=True, slots=True)
class ProviderSubscription:
    """A subscription as the provider holds it right now."""

    subscription_id: str
    customer_id: str
    status: str  # trialing, active, past_due, unpaid, incomplete, incomplete_expired, canceled
    price_id: str
    item_id: str
    current_period_start: datetime | None
    current_period_end: datetime | None
    billing_cycle_anchor: datetime | None
    trial_start: datetime | None
    trial_end: datetime | None
    cancel_at_period_end: bool
    canceled_at: datetime | None
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ProviderInvoice:
    invoice_id: str
    subscription_id: str | None
    customer_id: str
    billing_reason: str  # subscription_create, subscription_cycle, subscription_update, …
    status: str
    amount_paid_cents: int
    amount_due_cents: int
    price_id: str | None
    period_start: datetime | None
    period_end: datetime | None
    number: str = ""
    currency: str = "usd"
    total_cents: int = 0
    created: datetime | None = None
    hosted_url: str | None = None  # the provider's page for the invoice


@dataclass(frozen=True, slots=True)
class ChangePreview:
    """What a plan change costs, as the provider computes it: due at once (an upgrade's
    proration) and the next invoice."""

    currency: str
    due_today_cents: int
    next_invoice_cents: int
    next_invoice_at: datetime | None


class EventKind(StrEnum):
    """What a provider event means to us (the adapter maps the provider's event types)."""

    CHECKOUT_COMPLETED = "checkout_completed"
    SUBSCRIPTION_CHANGED = "subscription_changed"  # created or updated
    SUBSCRIPTION_ENDED = "subscription_ended"
    TRIAL_ENDING = "trial_ending"
    INVOICE_PAID = "invoice_paid"
    PAYMENT_FAILED = "payment_failed"
    OTHER = "other"  # stored, acknowledged, and ignored


@dataclass(frozen=True, slots=True)
class BillingEvent:
    """A verified webhook event, reduced to what the domain acts on."""

    event_id: str
    type: str  # the provider's own event type, stored as it came
    kind: EventKind
    created: datetime
    customer_id: str | None
    subscription_id: str | None
    client_reference_id: str | None  # checkout: our tenant id
    metadata: Mapping[str, str]
    invoice: ProviderInvoice | None
    payload: Mapping[str, Any]  # the raw event, stored for audit and re-processing


class BillingAdapter(Protocol):
    async def aclose(self) -> None:
        """Release connections (at shutdown)."""
        ...

    async def ensure_customer(
        self, tenant_id: str, email: str, name: str, existing: str | None
    ) -> str:
        """`existing` when the provider still has it, else a new customer's id."""
        ...

    async def ensure_price(
        self,
        plan_id: str,
        name: str,
        price_cents: int,
        currency: str,
        interval: str,
        existing: PriceRef | None,
    ) -> PriceRef:
        """`existing` when the provider still sells it, else a new product and price."""
        ...

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
    ) -> SessionLink: ...

    async def create_portal_session(self, customer_id: str, return_url: str) -> SessionLink: ...

    async def fetch_subscription(self, subscription_id: str) -> ProviderSubscription: ...

    async def change_price(
        self, subscription_id: str, item_id: str, price_id: str, *, upgrade: bool
    ) -> ProviderSubscription: ...

    async def cancel_at_period_end(
        self, subscription_id: str, cancel: bool
    ) -> ProviderSubscription: ...

    async def preview_change(
        self, subscription_id: str, item_id: str, price_id: str, *, upgrade: bool
    ) -> ChangePreview:
        """What change_price with the same arguments would charge now and next."""
        ...

    async def list_invoices(self, customer_id: str, limit: int = 12) -> list[ProviderInvoice]:
        """The customer's invoices, newest first."""
        ...

    def parse_webhook(self, payload: bytes, signature: str) -> BillingEvent:
        """Verify the signature on the raw body and parse; InvalidSignature otherwise."""
        ...

    def parse_stored_event(self, payload: Mapping[str, Any]) -> BillingEvent:
        """Parse an event stored earlier (already verified) for re-processing."""
        ...
