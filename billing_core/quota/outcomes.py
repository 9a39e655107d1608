"""How a quota decision is told: the windows a caller sees, allowed and denied decisions,
the upgrade offer, threshold notifications and usage records. Pure, like the rules."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar

from billing_core.errors import Conflict, InvalidRequest
from billing_core.quota.answers import CommitResult, Decision, WindowView
from billing_core.quota.model import Counts, PlanOffer, Reservation, TenantContext, UsageRecord
from billing_core.quota.requests import CommitRequest, ConsumeRequest, FreeRequest, ReportRequest
from billing_core.rules.limits import (
    Quota,
    Reason,
    Verdict,
    WindowCount,
    WindowState,
    access_reason,
    crossed_thresholds,
    denial_message,
    window_state,
)
from billing_core.rules.periods import Window
from billing_core.rules.pricing import TokenUsage
from billing_core.rules.resources import Overage

K = TypeVar("K")
_ALLOWED = Verdict(True, Reason.ALLOWED)
Notification = tuple[str, str, str, dict[str, Any]]  # kind, dedupe_key, message, details


def gate(
    ctx: TenantContext, quotas: Sequence[Quota], now: datetime, past_due_grace: timedelta
) -> Verdict | None:
    """The verdict when the subscription or the plan decides alone (no access, or no quota
    for the resource); None when the windows must decide."""
    reason = access_reason(ctx.access, now, past_due_grace)
    if reason is Reason.ALLOWED and quotas:
        return None
    if reason is Reason.ALLOWED and not ctx.unlimited:
        reason = Reason.RESOURCE_NOT_IN_PLAN
    return Verdict(reason is Reason.ALLOWED, reason)


def reused_request_id(request_id: str, operation: str) -> InvalidRequest:
    return InvalidRequest(
        f"request_id {request_id!r} was already used for a different request "
        f"({operation}); use a new request_id for new work"
    )


def settled_commit(res: Reservation, fingerprint: str) -> CommitResult | None:
    """A Commit of a reservation that is no longer live: the replay of its commit (None
    while the reservation is active or expired, i.e. still to be committed)."""
    if res.status == "committed":
        stored = res.commit_response or {}
        if stored.get("fingerprint") != fingerprint:
            raise InvalidRequest(
                f"reservation {res.reservation_id!r} was already committed with different values"
            )
        return CommitResult.from_json(stored, replayed=True)
    if res.status == "released":
        raise Conflict(f"reservation {res.reservation_id!r} was released; it cannot be committed")
    return None


def commit_charge(
    counts: Sequence[WindowCount], amount: int, cost: int, unlimited: bool
) -> tuple[int, bool]:
    """What a commit owes the wallet, and whether it went past a blocking limit."""
    if unlimited:
        return 0, False
    over_block = any(
        c.level + amount > c.quota.limit for c in counts if c.quota.overage is Overage.BLOCK
    )
    over_units = max(
        (
            min(amount, c.level + amount - max(c.quota.limit, c.level))
            for c in counts
            if c.quota.overage is Overage.WALLET and c.level + amount > c.quota.limit
        ),
        default=0,
    )
    charge = -(-cost * over_units // amount) if over_units else 0
    return charge, over_block or (over_units > 0 and cost == 0)


def add_delta(deltas: dict[K, tuple[int, int]], key: K, used: int, reserved: int) -> None:
    du, dr = deltas.get(key, (0, 0))
    deltas[key] = (du + used, dr + reserved)


def window_counts(
    quotas: Sequence[Quota], windows: Sequence[Window], counts: Counts, resource: str
) -> list[WindowCount]:
    return [
        WindowCount(q, w, *counts[(resource, w.period, w.start)])
        for q, w in zip(quotas, windows, strict=True)
    ]


def window_views(
    quotas: Sequence[Quota],
    windows: Sequence[Window],
    counts: Counts,
    resource: str,
    added: int,
    unlimited: bool,
) -> tuple[WindowView, ...]:
    views = []
    for q, w in zip(quotas, windows, strict=True):
        used, reserved = counts[(resource, w.period, w.start)]
        level = used + reserved + added
        views.append(
            WindowView(
                period=q.period,
                limit=q.limit,
                used=level,
                remaining=max(0, q.limit - level),
                resets_at=w.resets_at,
                state=WindowState.OK if unlimited else window_state(level, q),
                unlimited=unlimited,
                window_start=w.start,
            )
        )
    return tuple(views)


def allowed(
    ctx: TenantContext,
    quotas: Sequence[Quota],
    windows: Sequence[Window],
    counts: Counts,
    req: ConsumeRequest,
    cost: int,
    *,
    wallet_balance_micros: int | None = None,
    usage_record_id: str = "",
    reservation_id: str = "",
    expires_at: datetime | None = None,
) -> Decision:
    """The allowed decision: windows as they are after the request takes effect; the
    balance after its charge, and its record or reservation, when they are known."""
    return _decision(
        ctx,
        quotas,
        windows,
        counts,
        req,
        cost,
        _ALLOWED,
        wallet_balance_micros=wallet_balance_micros,
        usage_record_id=usage_record_id,
        reservation_id=reservation_id,
        expires_at=expires_at,
    )


def denial(
    ctx: TenantContext,
    quotas: Sequence[Quota],
    windows: Sequence[Window],
    counts: Counts,
    req: ConsumeRequest,
    cost: int,
    verdict: Verdict,
    now: datetime,
) -> Decision:
    """The denial; upgrade_plan_id carries the current plan until choose_upgrade runs."""
    return _decision(
        ctx,
        quotas,
        windows,
        counts,
        req,
        cost,
        verdict,
        message=denial_message(verdict, req.resource, ctx.timezone, now, req.amount),
        upgrade_plan_id=ctx.plan_id or "",
    )


def _decision(
    ctx: TenantContext,
    quotas: Sequence[Quota],
    windows: Sequence[Window],
    counts: Counts,
    req: ConsumeRequest,
    cost: int,
    verdict: Verdict,
    *,
    message: str = "",
    upgrade_plan_id: str = "",
    wallet_balance_micros: int | None = None,
    usage_record_id: str = "",
    reservation_id: str = "",
    expires_at: datetime | None = None,
) -> Decision:
    added = req.amount if verdict.allowed else 0  # a denial changes nothing
    return Decision(
        allowed=verdict.allowed,
        reason=verdict.reason,
        windows=window_views(quotas, windows, counts, req.resource, added, ctx.unlimited),
        cost_micros=cost,
        wallet_balance_micros=ctx.wallet_live_micros
        if wallet_balance_micros is None
        else wallet_balance_micros,
        usage_record_id=usage_record_id,
        message=message,
        upgrade_plan_id=upgrade_plan_id,
        reservation_id=reservation_id,
        expires_at=expires_at,
    )


def choose_upgrade(denial: Decision, amount: int, offers: Sequence[PlanOffer]) -> str:
    """The first (cheapest) offer that would have allowed the denied request, or ""."""
    levels = {w.period: w.used for w in denial.windows}
    for offer in offers:
        if offer.unlimited:
            return offer.plan_id
        if offer.quotas and all(levels.get(q.period, 0) + amount <= q.limit for q in offer.quotas):
            return offer.plan_id
    return ""


def thresholds(
    quotas: Sequence[Quota],
    windows: Sequence[Window],
    counts: Counts,
    resource: str,
    amount: int,
) -> list[Notification]:
    """The warning notifications `amount` more of `resource` crosses, one per threshold."""
    rows = []
    for quota, window in zip(quotas, windows, strict=True):
        used, reserved = counts[(resource, window.period, window.start)]
        before = used + reserved
        for threshold in crossed_thresholds(before, before + amount, quota):
            rows.append(threshold_row(quota, window, threshold, before + amount))
    return rows


def token_fields(tokens: TokenUsage | None) -> tuple[str | None, str | None, int, int]:
    if tokens is None:
        return None, None, 0, 0
    return tokens.provider, tokens.model, tokens.input_tokens, tokens.output_tokens


def consume_record(
    req: ConsumeRequest,
    record_id: str,
    plan_id: str | None,
    cost: int,
    charge: int,
    now: datetime,
) -> UsageRecord:
    return UsageRecord(
        record_id, now, req.resource, req.amount, "consume", req.request_id, None, plan_id,
        *token_fields(req.tokens), cost, charge, False, req.labels,
    )  # fmt: skip


def commit_record(
    req: CommitRequest,
    res: Reservation,
    record_id: str,
    plan_id: str | None,
    cost: int,
    paid: int,
    over_limit: bool,
    now: datetime,
) -> UsageRecord:
    """The usage record of a Commit: over the limit when it went past a blocking quota, or
    the wallet could not pay all it owed."""
    return UsageRecord(
        record_id, now, res.resource, req.amount, "commit", res.request_id, res.reservation_id,
        plan_id, *token_fields(req.tokens), cost, paid, over_limit, req.labels,
    )  # fmt: skip


def free_record(
    req: FreeRequest, record_id: str, plan_id: str | None, now: datetime
) -> UsageRecord:
    """The usage record of a Free: a negative amount of a cumulative resource."""
    return UsageRecord(
        record_id, now, req.resource, -req.amount, "free", req.request_id, None, plan_id,
        None, None, 0, 0, 0, 0, False, {},
    )  # fmt: skip


def report_record(
    req: ReportRequest, record_id: str, plan_id: str | None, cost: int, over_limit: bool
) -> UsageRecord:
    """The usage record of a ReportUsage: fail-open usage at the time it happened, paid by
    no wallet, over the limit when it pushed a window past it."""
    return UsageRecord(
        record_id, req.occurred_at, req.resource, req.amount, "fail_open", req.request_id,
        None, plan_id, *token_fields(req.tokens), cost, 0, over_limit, req.labels,
    )  # fmt: skip


def threshold_row(quota: Quota, window: Window, threshold: int, level: int) -> Notification:
    key = f"threshold:{quota.resource}:{quota.period.value}:{window.start.isoformat()}:{threshold}"
    message = (
        f"{quota.period.value.capitalize()} {quota.resource} usage reached {threshold}% "
        f"of the {quota.limit:,} limit."
    )
    details = {
        "resource": quota.resource,
        "period": quota.period.value,
        "window_start": window.start.isoformat(),
        "threshold": threshold,
        "limit": quota.limit,
        "used": level,
    }
    return "threshold", key, message, details
