"""/v1 endpoints that go through the payment provider: checkout, portal, plan changes,
cancellation, and the webhook events' admin view."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import quote

from billing_core.billing import payments, webhooks
from billing_core.billing.provider import BillingAdapter
from control_plane.api import schemas as s
from control_plane.api.routing import Call, Endpoint


@dataclass(frozen=True, slots=True)
class Urls:
    """Where the provider sends the browser back: the control plane's own pages."""

    public_base_url: str

    def success(self, tenant_id: str) -> str:
        return (
            f"{self.public_base_url}/billing/return?tenant={quote(tenant_id, safe='')}"
            "&session_id={CHECKOUT_SESSION_ID}"
        )

    def cancel(self, tenant_id: str) -> str:
        return (
            f"{self.public_base_url}/billing/plans?tenant={quote(tenant_id, safe='')}"
            "&checkout=canceled"
        )

    def portal_return(self, tenant_id: str) -> str:
        return f"{self.public_base_url}/billing?tenant={quote(tenant_id, safe='')}&from=portal"


def _adapter(call: Call) -> BillingAdapter:
    adapter: BillingAdapter = call.request.app.state.billing
    return adapter


def _urls(call: Call) -> Urls:
    return Urls(call.settings.public_base_url)


def _grace(call: Call) -> timedelta:
    return timedelta(days=call.settings.past_due_grace_days)


async def create_checkout(call: Call) -> s.SessionLink:
    b: s.CheckoutCreate = call.body
    tenant_id = call.path["tenant_id"]
    link = await payments.start_checkout(
        call.uow, _adapter(call), call.actor, tenant_id, b.plan_id, call.now,
        success_url=_urls(call).success(tenant_id), cancel_url=_urls(call).cancel(tenant_id),
    )  # fmt: skip
    return s.SessionLink(session_id=link.session_id, url=link.url)


async def create_portal(call: Call) -> s.SessionLink:
    tenant_id = call.path["tenant_id"]
    link = await payments.open_portal(
        call.uow, _adapter(call), tenant_id, return_url=_urls(call).portal_return(tenant_id)
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
    stored = await webhooks.reprocess(call.db, _adapter(call), call.path["event_id"], call.now)
    return s.WebhookEvent.model_validate(stored)


T = "/v1/tenants/{tenant_id}"
ENDPOINTS: list[Endpoint] = [
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
