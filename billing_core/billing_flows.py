"""Paid subscriptions through the payment provider: checkout, portal, plan changes,
cancellation, trial expiry. Nothing here trusts a browser: state changes come from the
provider's answers (server to server) or its verified webhooks (webhook_events.py)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import quote

from billing_core import catalog
from billing_core.admin import audit
from billing_core.admin.plans import PlanView, get_plan
from billing_core.admin.tenants import SubscriptionView, get_subscription, get_tenant
from billing_core.billing import BillingAdapter, PriceRef, ProviderSubscription, SessionLink
from billing_core.db.quota_store import Conn
from billing_core.errors import Conflict
from billing_core.ids import new_id
from billing_core.limits import SubscriptionStatus

LIVE = ("trialing", "active", "past_due", "unpaid", "incomplete")
_STATUS = {s.value for s in SubscriptionStatus}


@dataclass(frozen=True, slots=True)
class Urls:
    """Where the provider sends the browser back (the control plane's own pages)."""

    public_base_url: str

    def success(self, tenant_id: str) -> str:
        return (
            f"{self.public_base_url}/billing/return?tenant={quote(tenant_id, safe='')}"
            "&session_id={CHECKOUT_SESSION_ID}"
        )

    def cancel(self, tenant_id: str) -> str:
        return (
            f"{self.public_base_url}/billing?tenant={quote(tenant_id, safe='')}&checkout=canceled"
        )

    def portal_return(self, tenant_id: str) -> str:
        return f"{self.public_base_url}/billing?tenant={quote(tenant_id, safe='')}"


def _self_serve(plan: PlanView) -> None:
    if not plan.spec.active:
        raise Conflict(f"plan {plan.plan_id!r} is archived and takes no new subscribers")
    if plan.spec.enterprise or plan.spec.price_cents <= 0:
        raise Conflict(
            f"plan {plan.plan_id!r} is not sold through checkout (enterprise and free plans "
            "are assigned with PUT /v1/tenants/{tenant_id}/subscription)"
        )


async def _stripe_subscription(conn: Conn, tenant_id: str) -> tuple[str, str, str] | None:
    """(stripe subscription id, status, plan id) of the tenant's current provider subscription."""
    cur = await conn.execute(
        "SELECT stripe_subscription_id, status, plan_id FROM subscriptions"
        " WHERE tenant_id = %s AND is_current AND stripe_subscription_id IS NOT NULL",
        (tenant_id,),
    )
    row = await cur.fetchone()
    return None if row is None else (row[0], row[1], row[2])


async def _price_for(conn: Conn, adapter: BillingAdapter, plan: PlanView) -> str:
    cur = await conn.execute(
        "SELECT stripe_product_id, stripe_price_id FROM plans WHERE plan_id = %s FOR UPDATE",
        (plan.plan_id,),
    )
    row = await cur.fetchone()
    assert row is not None
    existing = PriceRef(row[0] or "", row[1]) if row[1] else None
    spec = plan.spec
    ref = await adapter.ensure_price(
        plan.plan_id, spec.name, spec.price_cents, spec.currency, spec.interval, existing
    )
    if ref != existing:
        await conn.execute(
            "UPDATE plans SET stripe_product_id = %s, stripe_price_id = %s WHERE plan_id = %s",
            (ref.product_id, ref.price_id, plan.plan_id),
        )
        await catalog.remember_stripe_price(conn, plan.plan_id, ref.price_id)
    return ref.price_id


async def _customer_for(conn: Conn, adapter: BillingAdapter, tenant_id: str) -> str:
    cur = await conn.execute(
        "SELECT stripe_customer_id, email, name FROM tenants WHERE tenant_id = %s FOR UPDATE",
        (tenant_id,),
    )
    row = await cur.fetchone()
    assert row is not None
    customer_id = await adapter.ensure_customer(tenant_id, row[1], row[2], row[0])
    if customer_id != row[0]:
        await conn.execute(
            "UPDATE tenants SET stripe_customer_id = %s WHERE tenant_id = %s",
            (customer_id, tenant_id),
        )
    return customer_id


async def start_checkout(
    conn: Conn,
    adapter: BillingAdapter,
    urls: Urls,
    actor: str,
    tenant_id: str,
    plan_id: str,
    now: datetime,
) -> SessionLink:
    """A hosted checkout for a new paid subscription (with the plan's trial when the tenant
    never had one). The subscription appears only when the provider confirms payment."""
    async with conn.transaction():
        tenant = await get_tenant(conn, tenant_id, lock=True)
        plan = await get_plan(conn, plan_id)
        _self_serve(plan)
        current = await _stripe_subscription(conn, tenant_id)
        if current is not None and current[1] in LIVE:
            raise Conflict(
                f"tenant {tenant_id!r} already pays for {current[2]!r}: change the plan with "
                "POST /v1/tenants/{tenant_id}/subscription/change or the billing portal"
            )
        customer_id = await _customer_for(conn, adapter, tenant_id)
        price_id = await _price_for(conn, adapter, plan)
        trial_days = plan.spec.trial_days if plan.spec.trial and not tenant.trial_used_at else 0
        link = await adapter.create_checkout_session(
            tenant_id=tenant_id,
            customer_id=customer_id,
            price_id=price_id,
            trial_days=trial_days,
            success_url=urls.success(tenant_id),
            cancel_url=urls.cancel(tenant_id),
            # a double click within a minute gets the same session back
            idempotency_key=f"checkout-{tenant_id}-{price_id}-{now:%Y%m%d%H%M}",
        )
        await audit.record_tenant(
            conn,
            actor,
            "checkout.start",
            tenant_id,
            None,
            {"plan_id": plan_id, "session_id": link.session_id, "trial_days": trial_days},
            now,
        )
    return link


async def open_portal(
    conn: Conn, adapter: BillingAdapter, urls: Urls, tenant_id: str
) -> SessionLink:
    tenant = await get_tenant(conn, tenant_id)
    cur = await conn.execute(
        "SELECT stripe_customer_id FROM tenants WHERE tenant_id = %s", (tenant.tenant_id,)
    )
    row = await cur.fetchone()
    if row is None or not row[0]:
        raise Conflict(f"tenant {tenant_id!r} has never paid: there is no billing portal yet")
    return await adapter.create_portal_session(str(row[0]), urls.portal_return(tenant_id))


async def change_plan(
    conn: Conn,
    adapter: BillingAdapter,
    actor: str,
    tenant_id: str,
    plan_id: str,
    now: datetime,
    grace: timedelta,
) -> SubscriptionView:
    """Upgrade (charged now, prorated; applied only if the payment succeeds) or downgrade
    (credited on the next invoice) the tenant's paid subscription."""
    async with conn.transaction():
        await get_tenant(conn, tenant_id, lock=True)
        current = await _stripe_subscription(conn, tenant_id)
        if current is None or current[1] not in LIVE:
            raise Conflict(f"tenant {tenant_id!r} has no paid subscription to change; use checkout")
        sub_id, _, current_plan_id = current
        if current_plan_id == plan_id:
            return await get_subscription(conn, tenant_id, now, grace)
        target = await get_plan(conn, plan_id)
        _self_serve(target)
        now_plan = await get_plan(conn, current_plan_id)
        if target.spec.interval != now_plan.spec.interval:
            raise Conflict("changing between monthly and yearly billing goes through the portal")
        before = await get_subscription(conn, tenant_id, now, grace)
        price_id = await _price_for(conn, adapter, target)
        provider = await adapter.fetch_subscription(sub_id)
        changed = await adapter.change_price(
            sub_id,
            provider.item_id,
            price_id,
            upgrade=target.spec.price_cents > now_plan.spec.price_cents,
        )
        if changed.price_id != price_id:
            raise Conflict(
                "the payment for the upgrade did not go through; the plan is unchanged "
                "(update the card in the billing portal and try again)"
            )
        await apply_provider_subscription(conn, tenant_id, changed, now)
        after = await get_subscription(conn, tenant_id, now, grace)
        await audit.record_tenant(conn, actor, "subscription.change", tenant_id, before, after, now)
    return after


async def set_cancel_at_period_end(
    conn: Conn,
    adapter: BillingAdapter,
    actor: str,
    tenant_id: str,
    cancel: bool,
    now: datetime,
    grace: timedelta,
) -> SubscriptionView:
    async with conn.transaction():
        await get_tenant(conn, tenant_id, lock=True)
        current = await _stripe_subscription(conn, tenant_id)
        if current is None or current[1] not in LIVE:
            raise Conflict(f"tenant {tenant_id!r} has no paid subscription to cancel")
        before = await get_subscription(conn, tenant_id, now, grace)
        changed = await adapter.cancel_at_period_end(current[0], cancel)
        await apply_provider_subscription(conn, tenant_id, changed, now)
        after = await get_subscription(conn, tenant_id, now, grace)
        await audit.record_tenant(
            conn,
            actor,
            "subscription.cancel" if cancel else "subscription.resume",
            tenant_id,
            before,
            after,
            now,
        )
    return after


async def apply_provider_subscription(
    conn: Conn, tenant_id: str, sub: ProviderSubscription, now: datetime
) -> str:
    """Make our row say what the provider says (the caller holds the tenant's lock).
    A live subscription becomes the tenant's one current subscription."""
    found = await catalog.plan_for_stripe_price(conn, sub.price_id)
    if found is None:
        raise Conflict(f"no plan sells the provider's price {sub.price_id!r}")
    plan_id = found
    status = sub.status if sub.status in _STATUS else "unpaid"  # e.g. Stripe's 'paused'
    live = status in LIVE
    cur = await conn.execute(
        "SELECT subscription_id, is_current, past_due_since FROM subscriptions"
        " WHERE tenant_id = %s AND stripe_subscription_id = %s",
        (tenant_id, sub.subscription_id),
    )
    existing = await cur.fetchone()
    past_due_since = None
    if status == "past_due":
        past_due_since = (existing[2] if existing else None) or now
    if live:
        await conn.execute(
            "UPDATE subscriptions SET is_current = false, updated_at = %s"
            " WHERE tenant_id = %s AND is_current AND stripe_subscription_id IS DISTINCT FROM %s",
            (now, tenant_id, sub.subscription_id),
        )
    values = (
        plan_id,
        status,
        sub.customer_id,
        sub.current_period_start,
        sub.current_period_end,
        sub.billing_cycle_anchor or sub.current_period_start or now,
        sub.trial_start,
        sub.trial_end,
        sub.cancel_at_period_end,
        past_due_since,
        sub.canceled_at,
        now,
    )
    if existing is None:
        cur = await conn.execute(
            "SELECT 1 FROM subscriptions WHERE tenant_id = %s AND is_current", (tenant_id,)
        )
        current = live or await cur.fetchone() is None
        subscription_id = new_id("sub", now)
        await conn.execute(
            "INSERT INTO subscriptions (plan_id, status, stripe_customer_id, current_period_start,"
            " current_period_end, billing_cycle_anchor, trial_start, trial_end,"
            " cancel_at_period_end, past_due_since, canceled_at, updated_at, tenant_id,"
            " subscription_id, stripe_subscription_id, is_current, created_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (*values, tenant_id, subscription_id, sub.subscription_id, current, now),
        )
    else:
        subscription_id = str(existing[0])
        await conn.execute(
            "UPDATE subscriptions SET plan_id = %s, status = %s, stripe_customer_id = %s,"
            " current_period_start = %s, current_period_end = %s, billing_cycle_anchor = %s,"
            " trial_start = %s, trial_end = %s, cancel_at_period_end = %s, past_due_since = %s,"
            " canceled_at = %s, updated_at = %s, is_current = is_current OR %s"
            " WHERE tenant_id = %s AND subscription_id = %s",
            (*values, live, tenant_id, subscription_id),
        )
    if sub.trial_start is not None:
        await conn.execute(
            "UPDATE tenants SET trial_used_at = coalesce(trial_used_at, %s) WHERE tenant_id = %s",
            (sub.trial_start, tenant_id),
        )
    return subscription_id


async def expire_trials(conn: Conn, now: datetime) -> int:
    """Move our own (card-less) trials past their end to trial_expired; running it twice
    changes nothing. Trials at the provider end there and arrive by webhook."""
    cur = await conn.execute(
        "UPDATE subscriptions SET status = 'trial_expired', updated_at = %s"
        " WHERE is_current AND status = 'trialing' AND trial_end <= %s"
        " AND stripe_subscription_id IS NULL",
        (now, now),
    )
    return cur.rowcount
