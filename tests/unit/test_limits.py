"""Plan-limit evaluation: every reason, thresholds, unlimited, wallet overage, messages."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from billing_core.rules.limits import (
    Access,
    Quota,
    Reason,
    SubscriptionStatus,
    Verdict,
    WindowCount,
    WindowState,
    access_reason,
    crossed_thresholds,
    decide,
    denial_message,
    status_at,
    window_state,
)
from billing_core.rules.periods import EPOCH, Window
from billing_core.rules.resources import Overage, Period

NOW = datetime(2026, 3, 10, 12, tzinfo=UTC)
GRACE = timedelta(days=3)
DAY = Window(Period.DAILY, datetime(2026, 3, 10, tzinfo=UTC), datetime(2026, 3, 11, tzinfo=UTC))
MONTH = Window(Period.MONTHLY, datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 4, 1, tzinfo=UTC))
FOREVER = Window(Period.CUMULATIVE, EPOCH, None)

S = SubscriptionStatus
ACCESS_CASES = [
    ("active", Access(S.ACTIVE), Reason.ALLOWED),
    ("trialing", Access(S.TRIALING, trial_end=NOW + timedelta(days=1)), Reason.ALLOWED),
    ("trial-ended", Access(S.TRIALING, trial_end=NOW), Reason.TRIAL_EXPIRED),
    ("trial-expired", Access(S.TRIAL_EXPIRED), Reason.TRIAL_EXPIRED),
    (
        "past-due-in-grace",
        Access(S.PAST_DUE, past_due_since=NOW - timedelta(days=2)),
        Reason.ALLOWED,
    ),
    (
        "past-due-after-grace",
        Access(S.PAST_DUE, past_due_since=NOW - GRACE),
        Reason.PAYMENT_PAST_DUE,
    ),
    ("past-due-unknown-since", Access(S.PAST_DUE), Reason.PAYMENT_PAST_DUE),
    ("unpaid", Access(S.UNPAID), Reason.PAYMENT_PAST_DUE),
    ("canceled", Access(S.CANCELED), Reason.NO_ACTIVE_SUBSCRIPTION),
    ("incomplete", Access(S.INCOMPLETE), Reason.NO_ACTIVE_SUBSCRIPTION),
    ("none", Access(None), Reason.NO_ACTIVE_SUBSCRIPTION),
]


@pytest.mark.parametrize(
    ("access", "reason"), [c[1:] for c in ACCESS_CASES], ids=[c[0] for c in ACCESS_CASES]
)
def test_access_reason(access: Access, reason: Reason) -> None:
    assert access_reason(access, NOW, GRACE) is reason


def test_the_status_at_a_moment_expires_a_trial_past_its_end() -> None:
    assert status_at(S.TRIALING, NOW, NOW) is S.TRIAL_EXPIRED
    assert status_at(S.TRIALING, NOW + timedelta(seconds=1), NOW) is S.TRIALING
    assert status_at(S.TRIALING, None, NOW) is S.TRIALING
    assert status_at(S.ACTIVE, NOW - timedelta(days=9), NOW) is S.ACTIVE


def count(
    limit: int,
    used: int,
    *,
    window: Window = DAY,
    reserved: int = 0,
    overage: Overage = Overage.BLOCK,
    warn_at: tuple[int, ...] = (80, 95),
) -> WindowCount:
    return WindowCount(
        Quota("tokens", window.period, limit, warn_at, overage), window, used, reserved
    )


DECIDE_CASES = [
    # (id, counts, amount, cost, wallet, unlimited, expected verdict)
    ("fits", [count(10, 5)], 5, 0, 0, False, Verdict(True, Reason.ALLOWED)),
    ("one-over", [count(10, 5)], 6, 0, 0, False, None),
    ("reserved-counts", [count(10, 3, reserved=3)], 5, 0, 0, False, None),
    ("zero-limit", [count(0, 0)], 1, 0, 0, False, None),
    ("second-window-blocks", [count(100, 0), count(10, 8, window=MONTH)], 3, 0, 0, False, None),
    ("unlimited-ignores-limits", [count(10, 10)], 99, 0, 0, True, Verdict(True, Reason.ALLOWED)),
    (
        "wallet-pays-overage-share",
        [count(10, 8, overage=Overage.WALLET)],
        4,
        1000,
        500,
        False,
        Verdict(True, Reason.ALLOWED, charge_micros=500),
    ),
    (
        "wallet-share-rounds-up",
        [count(10, 9, overage=Overage.WALLET)],
        3,
        10,
        100,
        False,
        Verdict(True, Reason.ALLOWED, charge_micros=7),
    ),
    ("wallet-too-small", [count(10, 8, overage=Overage.WALLET)], 4, 1000, 499, False, "credits"),
    ("unpriced-overage-blocks", [count(10, 8, overage=Overage.WALLET)], 4, 0, 10**9, False, None),
    (
        "wallet-already-over",
        [count(10, 12, overage=Overage.WALLET)],
        2,
        100,
        100,
        False,
        Verdict(True, Reason.ALLOWED, charge_micros=100),
    ),
]


@pytest.mark.parametrize(
    ("counts", "amount", "cost", "wallet", "unlimited", "expected"),
    [c[1:] for c in DECIDE_CASES],
    ids=[c[0] for c in DECIDE_CASES],
)
def test_decide(
    counts: list[WindowCount],
    amount: int,
    cost: int,
    wallet: int,
    unlimited: bool,
    expected: Verdict | str | None,
) -> None:
    verdict = decide(counts, amount, cost, wallet, unlimited=unlimited)
    if expected is None:
        assert (verdict.allowed, verdict.reason) == (False, Reason.QUOTA_EXCEEDED)
        assert verdict.blocking is not None
        assert verdict.blocking.level + amount > verdict.blocking.quota.limit
    elif expected == "credits":
        assert (verdict.allowed, verdict.reason) == (False, Reason.INSUFFICIENT_CREDITS)
    else:
        assert verdict == expected


@pytest.mark.parametrize(
    ("level", "limit", "state"),
    [
        (0, 100, WindowState.OK),
        (79, 100, WindowState.OK),
        (80, 100, WindowState.WARNING),
        (99, 100, WindowState.WARNING),
        (100, 100, WindowState.EXHAUSTED),
        (150, 100, WindowState.EXHAUSTED),
        (0, 0, WindowState.EXHAUSTED),
    ],
)
def test_window_state(level: int, limit: int, state: WindowState) -> None:
    assert window_state(level, Quota("tokens", Period.DAILY, limit)) is state


def test_thresholds_are_crossed_once_upwards() -> None:
    quota = Quota("tokens", Period.DAILY, 1000)
    assert crossed_thresholds(0, 799, quota) == []
    assert crossed_thresholds(0, 800, quota) == [80]
    assert crossed_thresholds(790, 960, quota) == [80, 95]
    assert crossed_thresholds(800, 900, quota) == []  # already past 80
    assert crossed_thresholds(900, 800, quota) == []  # going down crosses nothing


MESSAGES = [
    (
        Verdict(False, Reason.QUOTA_EXCEEDED, blocking=count(200_000, 200_000)),
        "Europe/Berlin",
        "Daily tokens limit of 200,000 reached; resets at 01:00 Europe/Berlin.",
    ),
    (
        Verdict(False, Reason.QUOTA_EXCEEDED, blocking=count(5_000_000, 5_000_000, window=MONTH)),
        "UTC",
        "Monthly tokens limit of 5,000,000 reached; resets on 2026-04-01 at 00:00 UTC.",
    ),
    (
        Verdict(False, Reason.QUOTA_EXCEEDED, blocking=count(3, 3, window=FOREVER)),
        "UTC",
        "Concurrent tokens limit of 3 reached (3 in use); free some or upgrade.",
    ),
    (
        Verdict(False, Reason.TRIAL_EXPIRED),
        "UTC",
        "The free trial has ended; choose a paid plan to continue.",
    ),
    (
        Verdict(False, Reason.RESOURCE_NOT_IN_PLAN),
        "UTC",
        "The current plan does not include tokens; upgrade to a plan that does.",
    ),
]


@pytest.mark.parametrize(
    ("verdict", "tz", "message"),
    MESSAGES,
    ids=["daily", "monthly", "cumulative", "trial", "not-in-plan"],
)
def test_denial_messages_are_plain_sentences(verdict: Verdict, tz: str, message: str) -> None:
    assert denial_message(verdict, "tokens", tz, NOW, 1) == message
