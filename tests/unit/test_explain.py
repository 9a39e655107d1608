"""Every billing state has a plain-language explanation that says what happens next."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from billing_core.rules.explain import explain_subscription
from billing_core.rules.limits import SubscriptionStatus as S

NOW = datetime(2026, 3, 10, 12, tzinfo=UTC)
LATER = NOW + timedelta(days=5)
BEFORE = NOW - timedelta(days=1)


@pytest.mark.parametrize(
    ("status", "extra", "expected"),
    [
        (None, {}, "No plan yet: choose a plan to start using the product."),
        (S.TRIALING, {"trial_end": LATER},
         "You are on a free trial of Pro until March 15, 2026. Add a payment method before "
         "then to keep your limits."),
        (S.TRIALING, {"trial_end": LATER, "card_on_file": True},
         "You are on a free trial of Pro until March 15, 2026; then it continues as your "
         "paid plan."),
        (S.TRIALING, {"trial_end": BEFORE},
         "Your free trial of Pro ended on March 9, 2026. Subscribe to keep using it."),
        (S.TRIAL_EXPIRED, {}, "Your free trial of Pro has ended. Subscribe to keep using it."),
        (S.ACTIVE, {"period_end": LATER}, "You are on Pro. It renews on March 15, 2026."),
        (S.ACTIVE, {"period_end": LATER, "cancel_at_period_end": True},
         "You are on Pro; it is cancelled and ends on March 15, 2026. You can resume it "
         "until then."),
        (S.ACTIVE, {}, "You are on Pro."),
        (S.PAST_DUE, {"past_due_since": BEFORE},
         "Your last payment for Pro failed. Update your payment method before March 12, 2026 "
         "to avoid losing access."),
        (S.PAST_DUE, {"past_due_since": NOW - timedelta(days=4)},
         "Your last payment for Pro failed and the grace period ended on March 9, 2026: usage "
         "is blocked until the payment goes through."),
        (S.UNPAID, {}, "Pro is unpaid: usage is blocked. Pay the open invoice to continue."),
        (S.INCOMPLETE, {}, "The first payment for Pro has not gone through yet."),
        (S.INCOMPLETE_EXPIRED, {},
         "The first payment for Pro never went through; choose a plan again."),
        (S.CANCELED, {}, "Your Pro subscription was cancelled. Choose a plan to continue."),
    ],
    ids=lambda v: getattr(v, "value", None) if isinstance(v, S) else None,
)  # fmt: skip
def test_each_state_is_explained(status: S | None, extra: dict[str, object], expected: str) -> None:
    got = explain_subscription(
        status=status,
        plan_name="Pro",
        price_cents=2000,
        now=NOW,
        **extra,  # type: ignore[arg-type]
    )
    assert got == expected


def test_every_status_is_covered() -> None:
    for status in S:
        text = explain_subscription(status=status, plan_name="Pro", price_cents=2000, now=NOW)
        assert "Pro" in text and text.endswith(".")
