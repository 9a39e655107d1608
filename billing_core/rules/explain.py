"""Plain-language explanations of billing states, for people (API, billing UI, admin UI)."""

from __future__ import annotations

from datetime import datetime, timedelta

from billing_core.rules.limits import SubscriptionStatus


def _day(at: datetime) -> str:
    return f"{at:%B} {at.day}, {at:%Y}"


def explain_subscription(
    *,
    status: SubscriptionStatus | None,
    plan_name: str,
    price_cents: int,
    now: datetime,
    trial_end: datetime | None = None,
    period_end: datetime | None = None,
    cancel_at_period_end: bool = False,
    past_due_since: datetime | None = None,
    grace: timedelta = timedelta(days=3),
    card_on_file: bool = False,
) -> str:
    """One or two sentences: what the tenant has, what happens next, what to do."""
    if status is None:
        return "No plan yet: choose a plan to start using the product."
    paid = price_cents > 0
    match status:
        case SubscriptionStatus.TRIALING if trial_end is not None and now >= trial_end:
            return (
                f"Your free trial of {plan_name} ended on {_day(trial_end)}. "
                "Subscribe to keep using it."
            )
        case SubscriptionStatus.TRIALING if card_on_file and trial_end is not None:
            return (
                f"You are on a free trial of {plan_name} until {_day(trial_end)}; "
                "then it continues as your paid plan."
            )
        case SubscriptionStatus.TRIALING:
            end = f" until {_day(trial_end)}" if trial_end else ""
            return (
                f"You are on a free trial of {plan_name}{end}. "
                "Add a payment method before then to keep your limits."
            )
        case SubscriptionStatus.TRIAL_EXPIRED:
            return f"Your free trial of {plan_name} has ended. Subscribe to keep using it."
        case SubscriptionStatus.ACTIVE if cancel_at_period_end and period_end is not None:
            return (
                f"You are on {plan_name}; it is cancelled and ends on {_day(period_end)}. "
                "You can resume it until then."
            )
        case SubscriptionStatus.ACTIVE if paid and period_end is not None:
            return f"You are on {plan_name}. It renews on {_day(period_end)}."
        case SubscriptionStatus.ACTIVE:
            return f"You are on {plan_name}."
        case SubscriptionStatus.PAST_DUE:
            since = past_due_since or now
            until = since + grace
            if now < until:
                return (
                    f"Your last payment for {plan_name} failed. Update your payment method "
                    f"before {_day(until)} to avoid losing access."
                )
            return (
                f"Your last payment for {plan_name} failed and the grace period ended on "
                f"{_day(until)}: usage is blocked until the payment goes through."
            )
        case SubscriptionStatus.UNPAID:
            return f"{plan_name} is unpaid: usage is blocked. Pay the open invoice to continue."
        case SubscriptionStatus.INCOMPLETE:
            return f"The first payment for {plan_name} has not gone through yet."
        case SubscriptionStatus.INCOMPLETE_EXPIRED:
            return f"The first payment for {plan_name} never went through; choose a plan again."
        case SubscriptionStatus.CANCELED:
            return f"Your {plan_name} subscription was cancelled. Choose a plan to continue."
    return f"Your {plan_name} subscription is {status.value}."  # pragma: no cover
