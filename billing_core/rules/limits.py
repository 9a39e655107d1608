"""Plan-limit evaluation: subscription access, per-window decisions, warnings, messages.

Pure: everything comes in as values (counts already read under lock, `now` injected),
a verdict goes out. The engine and the tests call the same functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import NamedTuple

from billing_core.rules.periods import Window
from billing_core.rules.resources import Overage, Period

DEFAULT_WARN_AT: tuple[int, ...] = (80, 95)


class Reason(StrEnum):
    ALLOWED = "allowed"
    QUOTA_EXCEEDED = "quota_exceeded"
    INSUFFICIENT_CREDITS = "insufficient_credits"
    NO_ACTIVE_SUBSCRIPTION = "no_active_subscription"
    TRIAL_EXPIRED = "trial_expired"
    PAYMENT_PAST_DUE = "payment_past_due"
    RESOURCE_NOT_IN_PLAN = "resource_not_in_plan"


class WindowState(StrEnum):
    OK = "ok"
    WARNING = "warning"
    EXHAUSTED = "exhausted"


class SubscriptionStatus(StrEnum):
    TRIALING = "trialing"
    ACTIVE = "active"
    PAST_DUE = "past_due"
    UNPAID = "unpaid"
    INCOMPLETE = "incomplete"
    INCOMPLETE_EXPIRED = "incomplete_expired"
    TRIAL_EXPIRED = "trial_expired"
    CANCELED = "canceled"


@dataclass(frozen=True, slots=True)
class Quota:
    resource: str
    period: Period
    limit: int
    warn_at: tuple[int, ...] = DEFAULT_WARN_AT
    overage: Overage = Overage.BLOCK


@dataclass(frozen=True, slots=True)
class Access:
    """What the subscription says before any window is looked at."""

    status: SubscriptionStatus | None
    trial_end: datetime | None = None
    past_due_since: datetime | None = None


def status_at(
    status: SubscriptionStatus, trial_end: datetime | None, now: datetime
) -> SubscriptionStatus:
    """The status as it stands at `now`: a trial past its end has expired, whether or not
    the job that writes so has run yet."""
    if status is SubscriptionStatus.TRIALING and trial_end is not None and now >= trial_end:
        return SubscriptionStatus.TRIAL_EXPIRED
    return status


def access_reason(access: Access, now: datetime, grace: timedelta) -> Reason:
    """ALLOWED when the subscription lets the tenant use its plan at `now`."""
    status = None if access.status is None else status_at(access.status, access.trial_end, now)
    if status is SubscriptionStatus.ACTIVE or status is SubscriptionStatus.TRIALING:
        return Reason.ALLOWED
    if status is SubscriptionStatus.TRIAL_EXPIRED:
        return Reason.TRIAL_EXPIRED
    if status is SubscriptionStatus.PAST_DUE:
        since = access.past_due_since
        if since is not None and now < since + grace:
            return Reason.ALLOWED
        return Reason.PAYMENT_PAST_DUE
    if status is SubscriptionStatus.UNPAID:
        return Reason.PAYMENT_PAST_DUE
    return Reason.NO_ACTIVE_SUBSCRIPTION


class WindowCount(NamedTuple):
    """One window's quota and its counts as read under the row lock (a tuple: two are built
    for every request a batch decides)."""

    quota: Quota
    window: Window
    used: int
    reserved: int = 0

    @property
    def level(self) -> int:
        return self.used + self.reserved


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    reason: Reason
    # the window that refused, for the message
    blocking: WindowCount | None = None
    # micros the wallet must pay for the part of the request past wallet-overage limits
    charge_micros: int = 0


def _ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def decide(
    counts: Sequence[WindowCount],
    amount: int,
    cost_micros: int,
    wallet_available_micros: int,
    *,
    unlimited: bool = False,
) -> Verdict:
    """Every window must take `amount`; past a wallet-overage limit the wallet pays.

    The wallet pays the share of the cost that falls past the limit (the largest such
    share over the windows), rounded up to a micro. An overage that cannot be priced
    (cost 0) is blocked: units past a limit are never free.
    """
    if unlimited:
        return Verdict(True, Reason.ALLOWED)
    over_units = 0
    for count in counts:
        after = count.level + amount
        if after <= count.quota.limit:
            continue
        if count.quota.overage is Overage.BLOCK or cost_micros <= 0:
            return Verdict(False, Reason.QUOTA_EXCEEDED, blocking=count)
        over_units = max(over_units, min(amount, after - max(count.quota.limit, count.level)))
    if over_units == 0:
        return Verdict(True, Reason.ALLOWED)
    charge = _ceil_div(cost_micros * over_units, amount)
    if charge > wallet_available_micros:
        blocking = next(c for c in counts if c.level + amount > c.quota.limit)
        return Verdict(False, Reason.INSUFFICIENT_CREDITS, blocking=blocking, charge_micros=charge)
    return Verdict(True, Reason.ALLOWED, charge_micros=charge)


def window_state(level: int, quota: Quota) -> WindowState:
    if level >= quota.limit:
        return WindowState.EXHAUSTED
    if any(level * 100 >= quota.limit * t for t in quota.warn_at):
        return WindowState.WARNING
    return WindowState.OK


def crossed_thresholds(before: int, after: int, quota: Quota) -> list[int]:
    """Warning thresholds (percent) that a move from `before` to `after` crosses upwards."""
    return [t for t in sorted(quota.warn_at) if before * 100 < quota.limit * t <= after * 100]


_PERIOD_WORD = {
    Period.DAILY: "Daily",
    Period.WEEKLY: "Weekly",
    Period.MONTHLY: "Monthly",
    Period.OVERALL: "Overall",
    Period.CUMULATIVE: "Concurrent",
}


def _when(at: datetime, tz_name: str, now: datetime) -> str:
    from zoneinfo import ZoneInfo

    local = at.astimezone(ZoneInfo(tz_name))
    if local - now.astimezone(local.tzinfo) <= timedelta(days=1):
        return f"at {local:%H:%M} {tz_name}"
    return f"on {local:%Y-%m-%d} at {local:%H:%M} {tz_name}"


def denial_message(
    verdict: Verdict, resource: str, tz_name: str, now: datetime, amount: int
) -> str:
    """One sentence a person understands, for a denied request."""
    reason = verdict.reason
    if reason is Reason.NO_ACTIVE_SUBSCRIPTION:
        return "There is no active subscription; choose a plan to continue."
    if reason is Reason.TRIAL_EXPIRED:
        return "The free trial has ended; choose a paid plan to continue."
    if reason is Reason.PAYMENT_PAST_DUE:
        return "The last payment failed and the grace period is over; update the payment method."
    if reason is Reason.RESOURCE_NOT_IN_PLAN:
        return f"The current plan does not include {resource}; upgrade to a plan that does."
    count = verdict.blocking
    if count is None:  # pragma: no cover - decide() always names the window
        return f"The request for {amount:,} {resource} was refused."
    quota = count.quota
    head = f"{_PERIOD_WORD[quota.period]} {resource} limit of {quota.limit:,}"
    if reason is Reason.INSUFFICIENT_CREDITS:
        return (
            f"{head} reached and the wallet cannot pay the overage of "
            f"{verdict.charge_micros / 1_000_000:,.6f} credits; add credits or upgrade."
        )
    if count.window.resets_at is not None:
        return f"{head} reached; resets {_when(count.window.resets_at, tz_name, now)}."
    if quota.period is Period.CUMULATIVE:
        return f"{head} reached ({count.level:,} in use); free some or upgrade."
    return f"{head} reached; it does not reset, upgrade for more."
