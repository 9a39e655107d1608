"""Provider webhooks: stored by event id first, then applied once in one transaction with
the outcome recorded (the dj-stripe shape), one small handler per kind of event.
Duplicates change nothing; order does not matter, because the subscription is re-read from
the provider under the tenant's lock and grants are keyed by subscription + period + kind."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import structlog

from billing_core.billing import audit
from billing_core.billing.model import StoredEvent
from billing_core.billing.pages import Page, check_limit, decode_cursor, page_of
from billing_core.billing.provider import BillingAdapter, BillingEvent, EventKind
from billing_core.billing.subscriptions import apply_plan_grant, apply_provider_subscription
from billing_core.db.unit_of_work import Database, UnitOfWork
from billing_core.errors import InvalidRequest, NotFound

log = structlog.get_logger()
STATUSES = ("received", "processed", "failed", "ignored")
GRANT_FOR_REASON = {
    "subscription_create": "start",
    "subscription_cycle": "renewal",
    "subscription_update": "upgrade",
}
Note = tuple[str, str, str, dict[str, Any]]  # kind, dedupe_key, message, details


async def receive(
    db: Database, adapter: BillingAdapter, event: BillingEvent, now: datetime
) -> tuple[str, bool]:
    """Store (once) and apply (once). Returns (status, duplicate). Raises when applying
    failed; the failure is recorded first, so the caller only has to answer 500."""
    async with db.transaction() as uow:
        await uow.webhook_events.store(event, now)
    return await process(db, adapter, event, now)


async def process(
    db: Database, adapter: BillingAdapter, event: BillingEvent, now: datetime
) -> tuple[str, bool]:
    try:
        async with db.transaction() as uow:
            status = await uow.webhook_events.lock_status(event.event_id)
            if status is None:
                raise NotFound(f"unknown event {event.event_id!r}")
            if status in ("processed", "ignored"):
                return status, True
            handler = HANDLERS.get(event.kind)
            if handler is not None:
                await _apply(uow, adapter, event, handler, now)
            status = "ignored" if handler is None else "processed"
            await uow.webhook_events.finish(event.event_id, status, now)
            return status, False
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        async with db.transaction() as uow:
            await uow.webhook_events.fail(event.event_id, error)
            await _tell_tenant(uow, event, now)
        log.error("webhook_failed", event_id=event.event_id, type=event.type, error=error)
        raise


async def reclaim_stale(
    db: Database, adapter: BillingAdapter, now: datetime, older_than: timedelta, limit: int = 100
) -> int:
    """Apply the events stored more than `older_than` ago and still `received`: their
    process died between storing and applying them, and the provider may not send them
    again. Each is applied as a delivery would (once; a failure is recorded on it). Returns
    how many were taken up."""
    async with db.transaction() as uow:
        payloads = await uow.webhook_events.stale(now - older_than, limit)
    for payload in payloads:
        event = adapter.parse_stored_event(payload)
        log.warning("webhook_reclaimed", event_id=event.event_id, type=event.type)
        with contextlib.suppress(Exception):  # recorded on the event by process()
            await process(db, adapter, event, now)
    return len(payloads)


async def _tell_tenant(uow: UnitOfWork, event: BillingEvent, now: datetime) -> None:
    """A notification for the tenant a failed event is about, when it is known: its billing
    may lag until the event is applied (once per event)."""
    tenant_id = (
        await uow.tenants.by_provider_customer(event.customer_id) if event.customer_id else None
    )
    if tenant_id is not None:
        note = (
            "billing_event_failed",
            f"webhook-failed:{event.event_id}",
            "A payment update could not be applied yet; it is retried and an operator can "
            "apply it again. Your plan shows the last state we know.",
            {"event_id": event.event_id, "type": event.type},
        )
        await uow.usage.notify(tenant_id, [note], now)


async def _tenant_for(uow: UnitOfWork, event: BillingEvent) -> str:
    """The tenant an event belongs to, linking the provider's customer on first sight."""
    if event.customer_id:
        found = await uow.tenants.by_provider_customer(event.customer_id)
        if found is not None:
            return found
    claimed = event.metadata.get("tenant_id") or event.client_reference_id
    if claimed:
        linked = await uow.tenants.link_provider_customer(claimed, event.customer_id)
        if linked is not None and (event.customer_id is None or linked == event.customer_id):
            return claimed
    raise NotFound(f"event {event.event_id} names no known tenant (customer {event.customer_id!r})")


Handler = Callable[[UnitOfWork, str, BillingEvent, datetime], Awaitable[list[Note]]]


async def _apply(
    uow: UnitOfWork, adapter: BillingAdapter, event: BillingEvent, handler: Handler, now: datetime
) -> None:
    tenant_id = await _tenant_for(uow, event)
    await uow.tenants.get(tenant_id, lock=True)
    if event.subscription_id:
        # the provider's state now, not the event's snapshot: late or repeated events
        # can never move the subscription back in time
        before = await uow.tenants.current_subscription(tenant_id)
        sub = await adapter.fetch_subscription(event.subscription_id)
        await apply_provider_subscription(uow, tenant_id, sub, now)
        after = await uow.tenants.current_subscription(tenant_id)
        if after != before:
            await audit.record_tenant(
                uow, f"stripe:{event.event_id}", f"subscription.{event.type}", tenant_id,
                before, after, now,
            )  # fmt: skip
    notes = await handler(uow, tenant_id, event, now)
    if notes:
        await uow.usage.notify(tenant_id, notes, now)


async def _subscription_only(
    uow: UnitOfWork, tenant_id: str, event: BillingEvent, now: datetime
) -> list[Note]:
    return []  # the subscription was brought up to date on the way


async def _invoice_paid(
    uow: UnitOfWork, tenant_id: str, event: BillingEvent, now: datetime
) -> list[Note]:
    """The plan's grant for what was paid (start, renewal, upgrade), once; a thank-you."""
    invoice = event.invoice
    if invoice is None or not invoice.subscription_id:
        return []
    on = GRANT_FOR_REASON.get(invoice.billing_reason)
    if on == "upgrade" and invoice.amount_paid_cents <= 0:
        on = None  # a downgrade's credit note is not an upgrade
    plan_id = await uow.plans.for_stripe_price(invoice.price_id) if invoice.price_id else None
    if on and plan_id:
        period = invoice.period_start.isoformat() if invoice.period_start else ""
        key = {
            "start": f"stripe:{invoice.subscription_id}:start",
            "renewal": f"stripe:{invoice.subscription_id}:renewal:{period}",
            "upgrade": f"stripe:{invoice.subscription_id}:upgrade:{invoice.invoice_id}",
        }[on]
        await apply_plan_grant(uow, tenant_id, plan_id, on, key, now)
    if invoice.amount_paid_cents <= 0:
        return []
    return [
        ("billing", f"paid:{invoice.invoice_id}",
         f"Payment of {_money(invoice.amount_paid_cents)} received. Thank you!",
         {"invoice_id": invoice.invoice_id})
    ]  # fmt: skip


async def _payment_failed(
    uow: UnitOfWork, tenant_id: str, event: BillingEvent, now: datetime
) -> list[Note]:
    invoice = event.invoice
    if invoice is None:
        return []
    return [
        ("billing", f"failed:{invoice.invoice_id}:{event.event_id}",
         f"A payment of {_money(invoice.amount_due_cents)} failed. Update your card in the "
         "billing portal to keep your plan.", {"invoice_id": invoice.invoice_id})
    ]  # fmt: skip


async def _trial_ending(
    uow: UnitOfWork, tenant_id: str, event: BillingEvent, now: datetime
) -> list[Note]:
    return [
        ("billing", f"trial_will_end:{event.subscription_id}",
         "Your free trial ends in 3 days. Add a card to keep your plan.", {})
    ]  # fmt: skip


async def _subscription_ended(
    uow: UnitOfWork, tenant_id: str, event: BillingEvent, now: datetime
) -> list[Note]:
    return [
        ("billing", f"canceled:{event.subscription_id}",
         "Your subscription has ended. Choose a plan to continue.", {})
    ]  # fmt: skip


HANDLERS: dict[EventKind, Handler] = {
    EventKind.CHECKOUT_COMPLETED: _subscription_only,
    EventKind.SUBSCRIPTION_CHANGED: _subscription_only,
    EventKind.SUBSCRIPTION_ENDED: _subscription_ended,
    EventKind.TRIAL_ENDING: _trial_ending,
    EventKind.INVOICE_PAID: _invoice_paid,
    EventKind.PAYMENT_FAILED: _payment_failed,
}


def _money(cents: int) -> str:
    return f"{cents // 100}.{cents % 100:02d}"


# --- operators: stored events, failed ones re-processed ------------------------------------


async def list_events(
    uow: UnitOfWork, *, status: str | None, limit: int, cursor: str | None
) -> Page[StoredEvent]:
    check_limit(limit)
    if status is not None and status not in STATUSES:
        raise InvalidRequest("status must be received, processed, failed or ignored")
    after = decode_cursor(cursor, 1)
    rows = await uow.webhook_events.page(
        status=status, after=after[0] if after else None, limit=limit + 1
    )
    return page_of(rows, limit, lambda e: [e.event_id])


async def get_event(uow: UnitOfWork, event_id: str) -> tuple[StoredEvent, dict[str, Any]]:
    found = await uow.webhook_events.get(event_id)
    if found is None:
        raise NotFound(f"unknown webhook event {event_id!r}")
    return found


async def reprocess(
    db: Database, adapter: BillingAdapter, actor: str, event_id: str, now: datetime
) -> StoredEvent:
    """Apply a stored event again (after fixing what made it fail); a processed event
    stays as it is. Who asked, and how it went, is in the audit log."""
    async with db.transaction() as uow:
        before, payload = await get_event(uow, event_id)
    event = adapter.parse_stored_event(payload)
    with contextlib.suppress(Exception):  # a new failure is recorded on the event itself
        await process(db, adapter, event, now)
    async with db.transaction() as uow:
        stored, _ = await get_event(uow, event_id)
        await audit.record(
            uow, actor=actor, action="webhook.reprocess", entity_type="webhook_event",
            entity_id=event_id, before=_outcome(before), after=_outcome(stored), now=now,
        )  # fmt: skip
    return stored


def _outcome(event: StoredEvent) -> dict[str, object]:
    return {"status": event.status, "attempts": event.attempts, "last_error": event.last_error}
