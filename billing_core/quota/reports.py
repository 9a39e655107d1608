"""GetUsage: every window of a tenant's plan (or of one resource) as the decisions see it,
read without locking anything; reservations past their expiry no longer count."""

from __future__ import annotations

from datetime import datetime

from billing_core.quota import core, outcomes
from billing_core.quota.answers import ResourceWindows, UsageReport
from billing_core.quota.core import Rules, SharedWindows, TenantState
from billing_core.quota.model import TenantKey
from billing_core.quota.ports import Pending, QuotaSession
from billing_core.quota.requests import UsageRequest
from billing_core.rules.limits import Reason, SubscriptionStatus, access_reason


async def report_usage(
    session: QuotaSession, req: UsageRequest, now: datetime, rules: Rules
) -> Pending[UsageReport]:
    resources = None if req.resource is None else [req.resource]
    reads = await session.read([req.tenant_id], resources, [], [], now)()
    ctx = reads.contexts.get(req.tenant_id)
    if ctx is None:
        raise core.unknown_tenant(req.tenant_id)
    state = TenantState(ctx)
    shared: SharedWindows = {}
    keys: list[TenantKey] = []
    for resource in sorted(ctx.quotas):
        _, windows = state.plan(resource, now, shared)
        keys += [(ctx.tenant_id, resource, w.period, w.start) for w in windows]
    counts_p = session.counters(keys)
    lapsed_p = (
        session.lapsed_reservations([ctx.tenant_id], now, lock=False)
        if ctx.has_expired_reservations
        else None
    )
    state.counts = {(k[1], k[2], k[3]): value for k, value in (await counts_p()).items()}
    state.lapsed = (await lapsed_p()).get(ctx.tenant_id, []) if lapsed_p else []
    core.leave_out_lapsed(state)

    reason = access_reason(ctx.access, now, rules.past_due_grace)
    status = ctx.access.status
    if status is SubscriptionStatus.TRIALING and reason is Reason.TRIAL_EXPIRED:
        status = SubscriptionStatus.TRIAL_EXPIRED
    report = UsageReport(
        plan_id=ctx.plan_id or "",
        subscription_status=status.value if status else "none",
        trial_ends_at=ctx.trial_end,
        resources=tuple(
            ResourceWindows(
                resource,
                outcomes.window_views(quotas, windows, state.counts, resource, 0, ctx.unlimited),
            )
            for resource, (quotas, windows) in state.windows.items()
        ),
        wallet_balance_micros=ctx.wallet_live_micros,
    )

    async def answer() -> UsageReport:
        return report

    return answer
