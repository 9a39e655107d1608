"""Subscriptions: the tenant's one current subscription, explained in plain language; plans
assigned without the payment provider (enterprise and free), trials, plan grants, the
provider's subscriptions made ours, and the expiry of our own trials."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta

from billing_core.billing import audit
from billing_core.billing.model import SubscriptionView
from billing_core.billing.plans import get_plan, require_open
from billing_core.billing.provider import ProviderSubscription
from billing_core.billing.tenants import get_tenant
from billing_core.db.tenants import SubscriptionRow
from billing_core.db.unit_of_work import UnitOfWork
from billing_core.errors import Conflict
from billing_core.ids import new_id
from billing_core.rules.explain import explain_subscription
from billing_core.rules.limits import SubscriptionStatus, status_at

# a subscription in one of these states is live: it is what the tenant has (and pays for)
LIVE = ("trialing", "active", "past_due", "unpaid", "incomplete")
_STATUSES = {s.value for s in SubscriptionStatus}


async def get_subscription(
    uow: UnitOfWork, tenant_id: str, now: datetime, grace: timedelta
) -> SubscriptionView:
    """The tenant's current subscription as it stands at `now` (a trial past its end shows
    as trial_expired before the expiry job has written so), explained in words."""
    await get_tenant(uow, tenant_id)
    current = await uow.tenants.current_subscription(tenant_id)
    if current is None:
        explanation = explain_subscription(status=None, plan_name="", price_cents=0, now=now)
        return SubscriptionView(
            tenant_id, None, None, None, "none", None, None, None, False, None, None, explanation
        )
    status = status_at(SubscriptionStatus(current.status), current.trial_end, now)
    explanation = explain_subscription(
        status=status,
        plan_name=current.plan_name,
        price_cents=current.price_cents,
        now=now,
        trial_end=current.trial_end,
        period_end=current.current_period_end,
        cancel_at_period_end=current.cancel_at_period_end,
        past_due_since=current.past_due_since,
        grace=grace,
        card_on_file=current.stripe_subscription_id is not None,
    )
    return SubscriptionView(
        tenant_id,
        current.subscription_id,
        current.plan_id,
        current.plan_name,
        status.value,
        current.trial_end,
        current.current_period_start,
        current.current_period_end,
        current.cancel_at_period_end,
        current.stripe_customer_id,
        current.stripe_subscription_id,
        explanation,
        current.past_due_since,
        current.enterprise,
    )


async def _replace_current(
    uow: UnitOfWork,
    tenant_id: str,
    plan_id: str,
    now: datetime,
    *,
    status: SubscriptionStatus,
    trial_end: datetime | None = None,
    anchor: datetime | None = None,
    past_due_since: datetime | None = None,
) -> str:
    """Make `plan_id` the tenant's current subscription (the previous one stops being
    current) and credit the plan's start grant once; the tenant is locked."""
    subscription_id = new_id("sub", now)
    await uow.tenants.end_current(tenant_id, now)
    await uow.tenants.insert_subscription(
        tenant_id,
        subscription_id,
        SubscriptionRow(
            plan_id=plan_id,
            status=status.value,
            is_current=True,
            current_period_start=now,
            billing_cycle_anchor=anchor or now,
            trial_start=now if trial_end else None,
            trial_end=trial_end,
            past_due_since=past_due_since,
        ),
        now,
    )
    await apply_plan_grant(uow, tenant_id, plan_id, "start", f"{subscription_id}:start", now)
    return subscription_id


async def subscribe(
    uow: UnitOfWork,
    actor: str,
    tenant_id: str,
    plan_id: str,
    now: datetime,
    *,
    status: SubscriptionStatus = SubscriptionStatus.ACTIVE,
    trial_end: datetime | None = None,
    anchor: datetime | None = None,
    past_due_since: datetime | None = None,
    grace: timedelta = timedelta(days=3),
) -> SubscriptionView:
    """Put the tenant on a plan in the given state, whatever the plan (seed data, an
    operator's repair, tests); the checks of assign_plan and start_trial are theirs."""
    await get_tenant(uow, tenant_id, lock=True)
    await get_plan(uow, plan_id)
    before = await get_subscription(uow, tenant_id, now, grace)
    await _replace_current(
        uow, tenant_id, plan_id, now, status=status, trial_end=trial_end, anchor=anchor,
        past_due_since=past_due_since,
    )  # fmt: skip
    return await recorded_change(uow, actor, "subscription.assign", before, now, grace)


async def recorded_change(
    uow: UnitOfWork,
    actor: str,
    action: str,
    before: SubscriptionView,
    now: datetime,
    grace: timedelta,
) -> SubscriptionView:
    """The subscription after a change, with the change's audit entry."""
    after = await get_subscription(uow, before.tenant_id, now, grace)
    await audit.record_tenant(uow, actor, action, before.tenant_id, before, after, now)
    return after


async def assign_plan(
    uow: UnitOfWork, actor: str, tenant_id: str, plan_id: str, now: datetime, grace: timedelta
) -> SubscriptionView:
    """Put the tenant on a plan without the provider: enterprise/contract plans and free
    plans. Assigning the plan the tenant is already actively on changes nothing (and grants
    nothing twice), so a retried PUT is harmless."""
    await get_tenant(uow, tenant_id, lock=True)
    plan = await get_plan(uow, plan_id)
    before = await get_subscription(uow, tenant_id, now, grace)
    if before.plan_id == plan_id and before.status == "active":
        return before
    require_open(plan)
    if plan.spec.self_serve:
        raise Conflict(
            f"plan {plan_id!r} is paid: subscribe through checkout; only enterprise and "
            "free plans are assigned directly"
        )
    await _replace_current(uow, tenant_id, plan_id, now, status=SubscriptionStatus.ACTIVE)
    return await recorded_change(uow, actor, "subscription.assign", before, now, grace)


async def start_trial(
    uow: UnitOfWork, actor: str, tenant_id: str, plan_id: str, now: datetime, grace: timedelta
) -> SubscriptionView:
    """One trial per tenant, ever; it replaces a free or lapsed plan, never a paid one."""
    tenant = await get_tenant(uow, tenant_id, lock=True)
    if tenant.trial_used_at is not None:
        raise Conflict(
            f"tenant {tenant_id!r} already had a trial (started {tenant.trial_used_at:%Y-%m-%d})"
        )
    plan = await get_plan(uow, plan_id)
    if not plan.spec.active or not plan.spec.trial:
        raise Conflict(f"plan {plan_id!r} offers no trial")
    before = await get_subscription(uow, tenant_id, now, grace)
    if before.plan_id is not None and before.status in LIVE:
        current = await get_plan(uow, before.plan_id)
        if current.spec.price_cents > 0:
            raise Conflict(f"tenant {tenant_id!r} is already on the paid plan {before.plan_id!r}")
    trial_end = now + timedelta(days=plan.spec.trial_days)
    await _replace_current(
        uow, tenant_id, plan_id, now, status=SubscriptionStatus.TRIALING, trial_end=trial_end
    )
    await uow.tenants.mark_trial_used(tenant_id, now)
    return await recorded_change(uow, actor, "subscription.trial", before, now, grace)


async def apply_plan_grant(
    uow: UnitOfWork, tenant_id: str, plan_id: str, on: str, key: str, now: datetime
) -> bool:
    """Credit the plan's `on` grant once per key (subscription + period + kind)."""
    grants = await uow.plans.wallet_grants(plan_id)
    grant = next((g for g in grants if g.on == on), None)
    if grant is None:
        return False
    days = grant.expires_after_days
    return await uow.wallet.add_grant(
        tenant_id,
        grant_id=new_id("grant", now),
        grant_key=f"plan:{key}",
        source=on,
        amount_micros=grant.amount_micros,
        expires_at=now + timedelta(days=days) if days else None,
        reason=f"plan {plan_id} {on} grant",
        now=now,
    )


async def apply_provider_subscription(
    uow: UnitOfWork, tenant_id: str, sub: ProviderSubscription, now: datetime
) -> str:
    """Make our row say what the provider says (the caller holds the tenant's lock). A
    live subscription becomes the tenant's one current subscription."""
    plan_id = await uow.plans.for_stripe_price(sub.price_id)
    if plan_id is None:
        raise Conflict(f"no plan sells the provider's price {sub.price_id!r}")
    status = sub.status if sub.status in _STATUSES else "unpaid"  # e.g. Stripe's 'paused'
    live = status in LIVE
    existing = await uow.tenants.by_provider_subscription(tenant_id, sub.subscription_id)
    past_due_since = None
    if status == "past_due":
        past_due_since = (existing[1] if existing else None) or now
    if live:
        await uow.tenants.end_current(tenant_id, now, keep=sub.subscription_id)
    row = SubscriptionRow(
        plan_id=plan_id,
        status=status,
        is_current=live,
        current_period_start=sub.current_period_start,
        current_period_end=sub.current_period_end,
        billing_cycle_anchor=sub.billing_cycle_anchor or sub.current_period_start or now,
        trial_start=sub.trial_start,
        trial_end=sub.trial_end,
        cancel_at_period_end=sub.cancel_at_period_end,
        past_due_since=past_due_since,
        canceled_at=sub.canceled_at,
        stripe_customer_id=sub.customer_id,
        stripe_subscription_id=sub.subscription_id,
    )
    if existing is None:
        subscription_id = new_id("sub", now)
        current = live or await uow.tenants.current_subscription(tenant_id) is None
        await uow.tenants.insert_subscription(
            tenant_id, subscription_id, replace(row, is_current=current), now
        )
    else:
        subscription_id = existing[0]
        await uow.tenants.update_subscription(tenant_id, subscription_id, row, now)
    if sub.trial_start is not None:
        await uow.tenants.mark_trial_used(tenant_id, sub.trial_start)
    return subscription_id


async def expire_trials(uow: UnitOfWork, actor: str, now: datetime) -> int:
    """Move our own (card-less) trials past their end to trial_expired, each with its
    audit entry; running it twice changes nothing. Trials at the provider end there and
    arrive by webhook."""
    expired = await uow.tenants.expire_trials(now)
    for tenant_id, subscription_id in expired:
        await audit.record_tenant(
            uow, actor, "subscription.trial_expired", tenant_id,
            {"subscription_id": subscription_id, "status": "trialing"},
            {"subscription_id": subscription_id, "status": "trial_expired"}, now,
        )  # fmt: skip
    return len(expired)
