"""/v1 endpoints of the billing flows: billing links to the billing pages, checkout,
portal, plan changes, cancellation, and the webhook events' admin view."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from billing_core.billing import payments, tenants, webhooks
from billing_core.billing.provider import BillingAdapter
from billing_core.errors import Unavailable
from control_plane.api import schemas as s
from control_plane.api.routing import Call, Endpoint
from control_plane.ui.web import Pages


@dataclass(frozen=True, slots=True)
class Urls:
    """Where the provider sends the browser back: the control plane's own billing pages
    (which show the tenant of the browser's billing session, never one named in a URL)."""

    public_base_url: str

    def success(self) -> str:
        return f"{self.public_base_url}/billing/return?session_id={{CHECKOUT_SESSION_ID}}"

    def cancel(self) -> str:
        return f"{self.public_base_url}/billing/plans?checkout=canceled"

    def portal_return(self) -> str:
        return f"{self.public_base_url}/billing?from=portal"


def _adapter(call: Call) -> BillingAdapter:
    adapter: BillingAdapter = call.request.app.state.billing
    return adapter


def _urls(call: Call) -> Urls:
    return Urls(call.settings.public_base_url)


def _grace(call: Call) -> timedelta:
    return timedelta(days=call.settings.past_due_grace_days)


async def create_billing_link(call: Call) -> s.BillingLink:
    """A signed link that opens the tenant's billing pages (for the platform to hand its
    user); the grant is in the audit log."""
    b: s.BillingLinkCreate = call.body
    pages: Pages = call.request.app.state.pages
    if pages.signer is None:
        raise Unavailable("billing links need BILLING_LINK_SECRET (32 characters or more)")
    expires_at = call.now + timedelta(seconds=b.expires_in_seconds)
    tenant = await tenants.grant_billing_access(
        call.uow, call.actor, call.path["tenant_id"], expires_at, call.now
    )
    url = pages.billing_link(tenant.tenant_id, b.return_url, expires_at, opens=b.opens)
    return s.BillingLink(url=url, expires_at=expires_at)


async def create_checkout(call: Call) -> s.SessionLink:
    b: s.CheckoutCreate = call.body
    tenant_id = call.path["tenant_id"]
    link = await payments.start_checkout(
        call.uow, _adapter(call), call.actor, tenant_id, b.plan_id, call.now,
        success_url=_urls(call).success(), cancel_url=_urls(call).cancel(),
    )  # fmt: skip
    return s.SessionLink(session_id=link.session_id, url=link.url)


async def create_portal(call: Call) -> s.SessionLink:
    tenant_id = call.path["tenant_id"]
    link = await payments.open_portal(
        call.uow, _adapter(call), tenant_id, return_url=_urls(call).portal_return()
    )
    return s.SessionLink(session_id=link.session_id, url=link.url)


async def change_plan(call: Call) -> s.Subscription:
    b: s.PlanChange = call.body
    view = await payments.change_plan(
        call.uow, _adapter(call), call.actor, call.path["tenant_id"], b.plan_id, call.now,
        _grace(call),
    )  # fmt: skip
    return s.Subscription.model_validate(view)


async def cancel(call: Call) -> s.Subscription:
    b: s.CancelChange = call.body
    view = await payments.set_cancel_at_period_end(
        call.uow, _adapter(call), call.actor, call.path["tenant_id"], b.cancel_at_period_end,
        call.now, _grace(call),
    )  # fmt: skip
    return s.Subscription.model_validate(view)


async def list_webhook_events(call: Call) -> s.WebhookEventPage:
    q: s.WebhookQuery = call.query
    page = await webhooks.list_events(call.uow, status=q.status, limit=q.limit, cursor=q.cursor)
    return s.WebhookEventPage(
        items=[s.WebhookEvent.model_validate(e) for e in page.items], next_cursor=page.next_cursor
    )


async def reprocess_webhook_event(call: Call) -> s.WebhookEvent:
    stored = await webhooks.reprocess(
        call.db, _adapter(call), call.actor, call.path["event_id"], call.now
    )
    if stored.status == "failed":
        call.request.app.state.webhook_failures.labels(type=stored.type).inc()
    return s.WebhookEvent.model_validate(stored)


T = "/v1/tenants/{tenant_id}"
ENDPOINTS: list[Endpoint] = [
    Endpoint("POST", T + "/billing-links", "create_billing_link",
             "A link that opens the tenant's billing pages", "billing", create_billing_link,
             s.BillingLink, body=s.BillingLinkCreate, status=201, errors=(404, 503),
             description="The platform sends its signed-in user to `url`: the link opens a "
             "session on the billing pages for this tenant only (12 hours by default). The "
             "link itself expires after `expires_in_seconds`."),
    Endpoint("POST", T + "/checkout-sessions", "create_checkout_session",
             "Start a hosted checkout for a paid plan", "billing", create_checkout,
             s.SessionLink, body=s.CheckoutCreate, status=201, errors=(404, 409, 503),
             idempotent=True),
    Endpoint("POST", T + "/portal-sessions", "create_portal_session",
             "Open the billing portal (invoices, card, plan, cancel)", "billing", create_portal,
             s.SessionLink, body=s.EmptyBody, status=201, errors=(404, 409, 503)),
    Endpoint("POST", T + "/subscription/change", "change_subscription_plan",
             "Upgrade (charged now, prorated) or downgrade (credited)", "billing", change_plan,
             s.Subscription, body=s.PlanChange, errors=(404, 409, 503), idempotent=True),
    Endpoint("POST", T + "/subscription/cancel", "cancel_subscription",
             "Cancel at period end, or resume", "billing", cancel, s.Subscription,
             body=s.CancelChange, errors=(404, 409, 503)),
    Endpoint("GET", "/v1/webhook-events", "list_webhook_events",
             "Stored provider webhooks (?status=failed)", "billing", list_webhook_events,
             s.WebhookEventPage, query=s.WebhookQuery),
    Endpoint("POST", "/v1/webhook-events/{event_id}/reprocess", "reprocess_webhook_event",
             "Apply a stored event again", "billing", reprocess_webhook_event, s.WebhookEvent,
             errors=(404,)),
]  # fmt: skip
