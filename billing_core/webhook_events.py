"""Provider webhooks: stored by event id first, then applied once in one transaction, with
the outcome recorded. Duplicates change nothing; order does not matter, because the
subscription is re-read from the provider under the tenant's lock and grants are keyed by
subscription + period + kind."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog
from psycopg.types.json import Jsonb

from billing_core import catalog
from billing_core.admin import audit
from billing_core.admin.pages import Page, check_limit, decode_cursor, page_of
from billing_core.billing import BillingAdapter, BillingEvent
from billing_core.billing_flows import apply_provider_subscription
from billing_core.db import quota_store as store
from billing_core.db.quota_store import Conn
from billing_core.errors import InvalidRequest, NotFound

log = structlog.get_logger()
HANDLED = frozenset(
    {
        "checkout.session.completed",
        "customer.subscription.created",
        "customer.subscription.updated",
        "customer.subscription.deleted",
        "customer.subscription.trial_will_end",
        "invoice.paid",
        "invoice.payment_failed",
    }
)
GRANT_FOR_REASON = {
    "subscription_create": "start",
    "subscription_cycle": "renewal",
    "subscription_update": "upgrade",
}


@dataclass(frozen=True, slots=True)
class StoredEvent:
    event_id: str
    type: str
    status: str
    attempts: int
    last_error: str | None
    received_at: datetime
    processed_at: datetime | None


async def receive(
    conn: Conn, adapter: BillingAdapter, event: BillingEvent, now: datetime
) -> tuple[str, bool]:
    """Store (once) and apply (once). Returns (status, duplicate). Raises when applying
    failed; the failure is recorded first, so the caller only has to answer 500."""
    await conn.execute(
        "INSERT INTO stripe_webhook_events (event_id, type, payload, status, attempts,"
        " stripe_created_at, received_at) VALUES (%s, %s, %s, 'received', 0, %s, %s)"
        " ON CONFLICT (event_id) DO NOTHING",
        (event.event_id, event.type, Jsonb(dict(event.payload)), event.created, now),
    )
    return await process(conn, adapter, event, now)


async def process(
    conn: Conn, adapter: BillingAdapter, event: BillingEvent, now: datetime
) -> tuple[str, bool]:
    try:
        async with conn.transaction():
            cur = await conn.execute(
                "SELECT status FROM stripe_webhook_events WHERE event_id = %s FOR UPDATE",
                (event.event_id,),
            )
            row = await cur.fetchone()
            if row is None:
                raise NotFound(f"unknown event {event.event_id!r}")
            if row[0] in ("processed", "ignored"):
                return str(row[0]), True
            status = "processed" if event.type in HANDLED else "ignored"
            if status == "processed":
                await _apply(conn, adapter, event, now)
            await conn.execute(
                "UPDATE stripe_webhook_events SET status = %s, attempts = attempts + 1,"
                " last_error = NULL, processed_at = %s WHERE event_id = %s",
                (status, now, event.event_id),
            )
            return status, False
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        await conn.execute(
            "UPDATE stripe_webhook_events SET status = 'failed', attempts = attempts + 1,"
            " last_error = %s WHERE event_id = %s",
            (error[:2000], event.event_id),
        )
        log.error("webhook_failed", event_id=event.event_id, type=event.type, error=error)
        raise


async def _tenant_for(conn: Conn, event: BillingEvent) -> str:
    """The tenant an event belongs to, linking the provider's customer on first sight."""
    claimed = event.metadata.get("tenant_id") or event.client_reference_id
    if event.customer_id:
        cur = await conn.execute(
            "SELECT tenant_id FROM tenants WHERE stripe_customer_id = %s", (event.customer_id,)
        )
        row = await cur.fetchone()
        if row is not None:
            return str(row[0])
    if claimed:
        cur = await conn.execute(
            "UPDATE tenants SET stripe_customer_id = coalesce(stripe_customer_id, %s)"
            " WHERE tenant_id = %s RETURNING stripe_customer_id",
            (event.customer_id, claimed),
        )
        row = await cur.fetchone()
        if row is not None and (event.customer_id is None or row[0] == event.customer_id):
            return claimed
    raise NotFound(f"event {event.event_id} names no known tenant (customer {event.customer_id!r})")


async def _apply(conn: Conn, adapter: BillingAdapter, event: BillingEvent, now: datetime) -> None:
    tenant_id = await _tenant_for(conn, event)
    await conn.execute("SELECT 1 FROM tenants WHERE tenant_id = %s FOR UPDATE", (tenant_id,))
    if event.subscription_id:
        # the provider's state now, not the event's snapshot: late or repeated events
        # can never move the subscription back in time
        before = await _subscription_state(conn, tenant_id)
        sub = await adapter.fetch_subscription(event.subscription_id)
        await apply_provider_subscription(conn, tenant_id, sub, now)
        after = await _subscription_state(conn, tenant_id)
        if after != before:
            await audit.record_tenant(
                conn,
                f"stripe:{event.event_id}",
                f"subscription.{event.type}",
                tenant_id,
                before,
                after,
                now,
            )
    notes: list[tuple[str, str, str, dict[str, Any]]] = []
    invoice = event.invoice
    if event.type == "invoice.paid" and invoice is not None and invoice.subscription_id:
        on = GRANT_FOR_REASON.get(invoice.billing_reason)
        if on == "upgrade" and invoice.amount_paid_cents <= 0:
            on = None  # a downgrade's credit note is not an upgrade
        plan_id = (
            await catalog.plan_for_stripe_price(conn, invoice.price_id)
            if invoice.price_id
            else None
        )
        if on and plan_id:
            period = invoice.period_start.isoformat() if invoice.period_start else ""
            key = {
                "start": f"stripe:{invoice.subscription_id}:start",
                "renewal": f"stripe:{invoice.subscription_id}:renewal:{period}",
                "upgrade": f"stripe:{invoice.subscription_id}:upgrade:{invoice.invoice_id}",
            }[on]
            await catalog.apply_plan_grant(conn, tenant_id, plan_id, on, key, now)
        if invoice.amount_paid_cents > 0:
            notes.append(
                ("billing", f"paid:{invoice.invoice_id}",
                 f"Payment of {_money(invoice.amount_paid_cents)} received. Thank you!",
                 {"invoice_id": invoice.invoice_id})
            )  # fmt: skip
    elif event.type == "invoice.payment_failed" and invoice is not None:
        notes.append(
            ("billing", f"failed:{invoice.invoice_id}:{event.event_id}",
             f"A payment of {_money(invoice.amount_due_cents)} failed. Update your card in "
             "the billing portal to keep your plan.", {"invoice_id": invoice.invoice_id})
        )  # fmt: skip
    elif event.type == "customer.subscription.trial_will_end":
        notes.append(
            ("billing", f"trial_will_end:{event.subscription_id}",
             "Your free trial ends in 3 days. Add a card to keep your plan.", {})
        )  # fmt: skip
    elif event.type == "customer.subscription.deleted":
        notes.append(
            ("billing", f"canceled:{event.subscription_id}",
             "Your subscription has ended. Choose a plan to continue.", {})
        )  # fmt: skip
    if notes:
        await store.insert_notifications(conn, tenant_id, notes, now)


async def _subscription_state(conn: Conn, tenant_id: str) -> dict[str, Any] | None:
    cur = await conn.execute(
        "SELECT subscription_id, plan_id, status, cancel_at_period_end, current_period_end,"
        " stripe_subscription_id FROM subscriptions WHERE tenant_id = %s AND is_current",
        (tenant_id,),
    )
    row = await cur.fetchone()
    if row is None:
        return None
    names = ("subscription_id", "plan_id", "status", "cancel_at_period_end",
             "current_period_end", "stripe_subscription_id")  # fmt: skip
    return dict(zip(names, row, strict=True))


def _money(cents: int) -> str:
    return f"{cents // 100}.{cents % 100:02d}"


# --- admin: failed events and re-processing ---------------------------------------------------


async def list_events(
    conn: Conn, *, status: str | None, limit: int, cursor: str | None
) -> Page[StoredEvent]:
    check_limit(limit)
    if status is not None and status not in ("received", "processed", "failed", "ignored"):
        raise InvalidRequest("status must be received, processed, failed or ignored")
    after = decode_cursor(cursor, 1)
    cur = await conn.execute(
        "SELECT event_id, type, status, attempts, last_error, received_at, processed_at"
        " FROM stripe_webhook_events WHERE (%(status)s::text IS NULL OR status = %(status)s)"
        " AND (%(after)s::text IS NULL OR event_id > %(after)s) ORDER BY event_id LIMIT %(n)s",
        {"status": status, "after": after[0] if after else None, "n": limit + 1},
    )
    rows = [StoredEvent(*r) for r in await cur.fetchall()]
    return page_of(rows, limit, lambda e: [e.event_id])


async def get_event(conn: Conn, event_id: str) -> tuple[StoredEvent, dict[str, Any]]:
    cur = await conn.execute(
        "SELECT event_id, type, status, attempts, last_error, received_at, processed_at, payload"
        " FROM stripe_webhook_events WHERE event_id = %s",
        (event_id,),
    )
    row = await cur.fetchone()
    if row is None:
        raise NotFound(f"unknown webhook event {event_id!r}")
    payload = row[7] if isinstance(row[7], dict) else json.loads(row[7])
    return StoredEvent(*row[:7]), payload


async def reprocess(
    conn: Conn, adapter: BillingAdapter, event_id: str, now: datetime
) -> StoredEvent:
    """Apply a stored event again (after fixing what made it fail); a processed event
    stays as it is."""
    _, payload = await get_event(conn, event_id)
    event = adapter.parse_stored_event(payload)
    with contextlib.suppress(Exception):  # a new failure is recorded on the event itself
        await process(conn, adapter, event, now)
    stored, _ = await get_event(conn, event_id)
    return stored
