"""Paid subscriptions through the payment provider: checkout, portal, plan changes and
cancellation. Nothing here trusts a browser: state changes come from the provider's
answers (server to server) or its verified webhooks (webhooks.py)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from billing_core.billing import audit
from billing_core.billing.model import PlanView, SubscriptionView
from billing_core.billing.plans import get_plan, require_open
from billing_core.billing.provider import (
    BillingAdapter,
    ChangePreview,
    ProviderInvoice,
    SessionLink,
)
from billing_core.billing.subscriptions import (
    LIVE,
    apply_provider_subscription,
    get_subscription,
    recorded_change,
)
from billing_core.billing.tenants import get_tenant
from billing_core.db.unit_of_work import UnitOfWork
from billing_core.errors import Conflict


def _sold_through_checkout(plan: PlanView) -> None:
    require_open(plan)
    if not plan.spec.self_serve:
        raise Conflict(
            f"plan {plan.plan_id!r} is not sold through checkout (enterprise and free plans "
            "are assigned with PUT /v1/tenants/{tenant_id}/subscription)"
        )


async def _paid_subscription(uow: UnitOfWork, tenant_id: str) -> tuple[str, str, str] | None:
    """(provider subscription id, status, plan id) of the tenant's current paid one."""
    current = await uow.tenants.current_subscription(tenant_id)
    if current is None or current.stripe_subscription_id is None:
        return None
    return current.stripe_subscription_id, current.status, current.plan_id


async def _price_for(uow: UnitOfWork, adapter: BillingAdapter, plan: PlanView) -> str:
    existing = await uow.plans.lock_provider_price(plan.plan_id)
    spec = plan.spec
    ref = await adapter.ensure_price(
        plan.plan_id, spec.name, spec.price_cents, spec.currency, spec.interval, existing
    )
    if ref != existing:
        await uow.plans.set_provider_price(plan.plan_id, ref)
    return ref.price_id


async def _customer_for(uow: UnitOfWork, adapter: BillingAdapter, tenant_id: str) -> str:
    existing, email, name = await uow.tenants.billing_contact(tenant_id)
    customer_id = await adapter.ensure_customer(tenant_id, email, name, existing)
    if customer_id != existing:
        await uow.tenants.set_provider_customer(tenant_id, customer_id)
    return customer_id


async def start_checkout(
    uow: UnitOfWork,
    adapter: BillingAdapter,
    actor: str,
    tenant_id: str,
    plan_id: str,
    now: datetime,
    *,
    success_url: str,
    cancel_url: str,
) -> SessionLink:
    """A hosted checkout for a new paid subscription (with the plan's trial when the tenant
    never had one). The subscription appears only when the provider confirms payment."""
    tenant = await get_tenant(uow, tenant_id, lock=True)
    plan = await get_plan(uow, plan_id)
    _sold_through_checkout(plan)
    current = await _paid_subscription(uow, tenant_id)
    if current is not None and current[1] in LIVE:
        raise Conflict(
            f"tenant {tenant_id!r} already pays for {current[2]!r}: change the plan with "
            "POST /v1/tenants/{tenant_id}/subscription/change or the billing portal"
        )
    customer_id = await _customer_for(uow, adapter, tenant_id)
    price_id = await _price_for(uow, adapter, plan)
    trial_days = plan.spec.trial_days if plan.spec.trial and not tenant.trial_used_at else 0
    link = await adapter.create_checkout_session(
        tenant_id=tenant_id,
        customer_id=customer_id,
        price_id=price_id,
        trial_days=trial_days,
        success_url=success_url,
        cancel_url=cancel_url,
        # a double click within a minute gets the same session back
        idempotency_key=f"checkout-{tenant_id}-{price_id}-{now:%Y%m%d%H%M}",
    )
    await audit.record_tenant(
        uow,
        actor,
        "checkout.start",
        tenant_id,
        None,
        {"plan_id": plan_id, "session_id": link.session_id, "trial_days": trial_days},
        now,
    )
    return link


async def open_portal(
    uow: UnitOfWork, adapter: BillingAdapter, tenant_id: str, *, return_url: str
) -> SessionLink:
    await get_tenant(uow, tenant_id)
    customer_id = await uow.tenants.provider_customer(tenant_id)
    if customer_id is None:
        raise Conflict(f"tenant {tenant_id!r} has never paid: there is no billing portal yet")
    return await adapter.create_portal_session(customer_id, return_url)


@dataclass(frozen=True, slots=True)
class PlanChange:
    """A change of a paid subscription's plan, as the confirmation shows it."""

    subscription_id: str
    current: PlanView
    target: PlanView

    @property
    def upgrade(self) -> bool:
        return self.target.spec.price_cents > self.current.spec.price_cents


async def _plan_change(uow: UnitOfWork, tenant_id: str, plan_id: str) -> PlanChange | None:
    """The change to `plan_id` of the tenant's paid subscription (the tenant locked); None
    when it is on that plan already."""
    await get_tenant(uow, tenant_id, lock=True)
    current = await _paid_subscription(uow, tenant_id)
    if current is None or current[1] not in LIVE:
        raise Conflict(f"tenant {tenant_id!r} has no paid subscription to change; use checkout")
    subscription_id, _, current_plan_id = current
    if current_plan_id == plan_id:
        return None
    target = await get_plan(uow, plan_id)
    _sold_through_checkout(target)
    now_plan = await get_plan(uow, current_plan_id)
    if target.spec.interval != now_plan.spec.interval:
        raise Conflict("changing between monthly and yearly billing goes through the portal")
    return PlanChange(subscription_id, now_plan, target)


async def preview_plan_change(
    uow: UnitOfWork, adapter: BillingAdapter, tenant_id: str, plan_id: str
) -> tuple[PlanChange, ChangePreview]:
    """What changing to `plan_id` would change and cost (due now, and the next invoice),
    as the payment provider computes it; nothing changes."""
    change = await _plan_change(uow, tenant_id, plan_id)
    if change is None:
        raise Conflict(f"tenant {tenant_id!r} is on plan {plan_id!r} already")
    price_id = await _price_for(uow, adapter, change.target)
    provider = await adapter.fetch_subscription(change.subscription_id)
    cost = await adapter.preview_change(
        change.subscription_id, provider.item_id, price_id, upgrade=change.upgrade
    )
    return change, cost


async def change_plan(
    uow: UnitOfWork,
    adapter: BillingAdapter,
    actor: str,
    tenant_id: str,
    plan_id: str,
    now: datetime,
    grace: timedelta,
) -> SubscriptionView:
    """Upgrade (charged now, prorated; applied only if the payment succeeds) or downgrade
    (credited on the next invoice) the tenant's paid subscription."""
    change = await _plan_change(uow, tenant_id, plan_id)
    if change is None:
        return await get_subscription(uow, tenant_id, now, grace)
    before = await get_subscription(uow, tenant_id, now, grace)
    price_id = await _price_for(uow, adapter, change.target)
    provider = await adapter.fetch_subscription(change.subscription_id)
    changed = await adapter.change_price(
        change.subscription_id, provider.item_id, price_id, upgrade=change.upgrade
    )
    if changed.price_id != price_id:
        raise Conflict(
            "the payment for the upgrade did not go through; the plan is unchanged "
            "(update the card in the billing portal and try again)"
        )
    await apply_provider_subscription(uow, tenant_id, changed, now)
    return await recorded_change(uow, actor, "subscription.change", before, now, grace)


async def invoices(
    uow: UnitOfWork, adapter: BillingAdapter, tenant_id: str, limit: int = 12
) -> list[ProviderInvoice]:
    """The tenant's invoices at the payment provider, newest first (none before it paid)."""
    await get_tenant(uow, tenant_id)
    customer_id = await uow.tenants.provider_customer(tenant_id)
    return await adapter.list_invoices(customer_id, limit) if customer_id else []


async def set_cancel_at_period_end(
    uow: UnitOfWork,
    adapter: BillingAdapter,
    actor: str,
    tenant_id: str,
    cancel: bool,
    now: datetime,
    grace: timedelta,
) -> SubscriptionView:
    await get_tenant(uow, tenant_id, lock=True)
    current = await _paid_subscription(uow, tenant_id)
    if current is None or current[1] not in LIVE:
        raise Conflict(f"tenant {tenant_id!r} has no paid subscription to cancel")
    before = await get_subscription(uow, tenant_id, now, grace)
    changed = await adapter.cancel_at_period_end(current[0], cancel)
    await apply_provider_subscription(uow, tenant_id, changed, now)
    action = "subscription.cancel" if cancel else "subscription.resume"
    return await recorded_change(uow, actor, action, before, now, grace)
