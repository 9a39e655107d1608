"""Demo catalogue for `make run`: plans, model prices and tenants, created once."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from billing_core.billing.model import GrantSpec, PlanSpec, PriceView, quota
from billing_core.billing.plans import create_plan
from billing_core.billing.prices import set_price
from billing_core.billing.subscriptions import subscribe
from billing_core.billing.tenants import create_tenant
from billing_core.db.unit_of_work import UnitOfWork
from billing_core.rules.limits import SubscriptionStatus

ACTOR = "seed-demo"

DEMO_PLANS: dict[str, PlanSpec] = {
    "free": PlanSpec(
        name="Free",
        description="Try the product: small daily limits.",
        price_cents=0,
        priority=0,
        quotas=(
            quota("tokens", "daily", 20_000),
            quota("messages", "daily", 50),
            quota("agents", "cumulative", 1),
            quota("tool_calls", "daily", 20),
        ),
    ),
    "pro": PlanSpec(
        name="Pro",
        description="For individuals: generous limits, overage paid from credits.",
        price_cents=2_000,
        priority=10,
        trial=True,
        trial_days=14,
        quotas=(
            quota("tokens", "daily", 200_000, overage="wallet"),
            quota("tokens", "monthly", 5_000_000),
            quota("messages", "daily", 1_000),
            quota("agents", "cumulative", 10),
            quota("research_runs", "monthly", 50),
            quota("tool_calls", "daily", 2_000),
            quota("files", "cumulative", 500),
            quota("storage", "cumulative", 5_000_000_000),
        ),
        wallet_grants=(
            GrantSpec("start", 5_000_000, 30),
            GrantSpec("renewal", 5_000_000, 30),
            GrantSpec("upgrade", 2_000_000, 30),
        ),
    ),
    "team": PlanSpec(
        name="Team",
        description="For teams: higher limits, media processing and companions.",
        price_cents=10_000,
        priority=20,
        quotas=(
            quota("tokens", "daily", 2_000_000, overage="wallet"),
            quota("tokens", "monthly", 50_000_000),
            quota("messages", "daily", 20_000),
            quota("agents", "cumulative", 100),
            quota("bots", "cumulative", 20),
            quota("boards", "cumulative", 50),
            quota("companions", "cumulative", 20),
            quota("research_runs", "monthly", 500),
            quota("tool_calls", "daily", 50_000),
            quota("media_processing", "monthly", 1_000),
        ),
        wallet_grants=(
            GrantSpec("start", 20_000_000, 30),
            GrantSpec("renewal", 20_000_000, 30),
            GrantSpec("upgrade", 10_000_000, 30),
        ),
    ),
    "enterprise": PlanSpec(
        name="Enterprise",
        description="Contract plan: custom quotas per tenant.",
        price_cents=0,
        priority=30,
        enterprise=True,
        quotas=(quota("tokens", "monthly", 500_000_000), quota("agents", "cumulative", 1_000)),
    ),
}

DEMO_PRICES: list[tuple[str, str, int, int]] = [
    ("openai", "gpt-4o", 2_500_000, 10_000_000),
    ("openai", "gpt-4o-mini", 150_000, 600_000),
    ("anthropic", "claude-sonnet", 3_000_000, 15_000_000),
]


async def seed_demo(uow: UnitOfWork, now: datetime) -> bool:
    """Create the demo data unless it exists; True when it was created now."""
    if await uow.plans.get("free") is not None:
        return False
    for plan_id, spec in DEMO_PLANS.items():
        await create_plan(uow, ACTOR, spec, now, plan_id=plan_id)
    since = datetime(2024, 1, 1, tzinfo=UTC)
    for provider, model, inp, out in DEMO_PRICES:
        await set_price(uow, ACTOR, PriceView(provider, model, since, inp, out), now)
    tenants = [
        ("acme", "Acme Inc.", "Europe/Berlin", "pro", SubscriptionStatus.ACTIVE, None),
        ("globex", "Globex", "America/New_York", "free", SubscriptionStatus.ACTIVE, None),
        ("initech", "Initech", "UTC", "pro", SubscriptionStatus.TRIALING, now + timedelta(days=14)),
    ]
    for tenant_id, name, tz, plan_id, status, trial_end in tenants:
        email = f"owner@{tenant_id}.example"
        await create_tenant(uow, ACTOR, tenant_id, name, now, email=email, timezone=tz)
        await subscribe(uow, ACTOR, tenant_id, plan_id, now, status=status, trial_end=trial_end)
    return True
