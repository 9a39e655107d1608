"""Window arithmetic: DST both ways, month ends, leap days, anchors, ISO weeks."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from billing_core.errors import InvalidRequest
from billing_core.rules.periods import EPOCH, add_months, tenant_zone, window_for
from billing_core.rules.resources import Period


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


ANCHOR = utc(2026, 1, 15, 9, 30)

DAILY_CASES = [
    # (timezone, at, window start, resets at)
    ("UTC", utc(2026, 3, 10, 12), utc(2026, 3, 10), utc(2026, 3, 11)),
    ("Europe/Berlin", utc(2026, 3, 10, 23, 30), utc(2026, 3, 10, 23), utc(2026, 3, 11, 23)),
    # spring forward in Berlin (29 Mar 2026): the local day is 23 hours long
    ("Europe/Berlin", utc(2026, 3, 29, 12), utc(2026, 3, 28, 23), utc(2026, 3, 29, 22)),
    # fall back in Berlin (25 Oct 2026): the local day is 25 hours long
    ("Europe/Berlin", utc(2026, 10, 25, 12), utc(2026, 10, 24, 22), utc(2026, 10, 25, 23)),
    # New York, spring forward 8 Mar 2026 and fall back 1 Nov 2026
    ("America/New_York", utc(2026, 3, 8, 12), utc(2026, 3, 8, 5), utc(2026, 3, 9, 4)),
    ("America/New_York", utc(2026, 11, 1, 12), utc(2026, 11, 1, 4), utc(2026, 11, 2, 5)),
    # a zone whose DST change skips midnight itself (Santiago, 6 Sep 2026 00:00 → 01:00)
    ("America/Santiago", utc(2026, 9, 6, 12), utc(2026, 9, 6, 4), utc(2026, 9, 7, 3)),
    # east of UTC: 00:30 local on the 11th is still the 10th in UTC
    ("Asia/Tokyo", utc(2026, 3, 10, 15, 30), utc(2026, 3, 10, 15), utc(2026, 3, 11, 15)),
    ("Pacific/Kiritimati", utc(2026, 3, 10, 9), utc(2026, 3, 9, 10), utc(2026, 3, 10, 10)),
]


@pytest.mark.parametrize(
    ("tz", "at", "start", "resets"),
    DAILY_CASES,
    ids=[f"{c[0]}-{c[1]:%m%d%H%M}" for c in DAILY_CASES],
)
def test_daily_window_starts_at_tenant_midnight(
    tz: str, at: datetime, start: datetime, resets: datetime
) -> None:
    window = window_for(Period.DAILY, at, ZoneInfo(tz), ANCHOR)
    assert (window.start, window.resets_at) == (start, resets)
    assert window.start <= at < resets


WEEKLY_CASES = [
    ("UTC", utc(2026, 3, 11, 12), utc(2026, 3, 9), utc(2026, 3, 16)),  # Wednesday
    ("UTC", utc(2026, 3, 9, 0), utc(2026, 3, 9), utc(2026, 3, 16)),  # Monday 00:00 exactly
    ("UTC", utc(2026, 3, 15, 23, 59), utc(2026, 3, 9), utc(2026, 3, 16)),  # Sunday night
    # ISO week 1 of 2027 starts Monday 4 Jan 2027; 1 Jan 2027 (Friday) belongs to 2026-W53
    ("UTC", utc(2027, 1, 1, 12), utc(2026, 12, 28), utc(2027, 1, 4)),
    # the week containing Berlin's spring-forward is 167 hours long
    ("Europe/Berlin", utc(2026, 3, 27, 12), utc(2026, 3, 22, 23), utc(2026, 3, 29, 22)),
]


@pytest.mark.parametrize(
    ("tz", "at", "start", "resets"),
    WEEKLY_CASES,
    ids=[f"{c[0]}-{c[1]:%Y%m%d%H%M}" for c in WEEKLY_CASES],
)
def test_weekly_window_is_the_iso_week_from_monday(
    tz: str, at: datetime, start: datetime, resets: datetime
) -> None:
    window = window_for(Period.WEEKLY, at, ZoneInfo(tz), ANCHOR)
    assert (window.start, window.resets_at) == (start, resets)


MONTHLY_CASES = [
    # (anchor, at, start, resets)
    (utc(2026, 1, 15, 9, 30), utc(2026, 3, 20), utc(2026, 3, 15, 9, 30), utc(2026, 4, 15, 9, 30)),
    (
        utc(2026, 1, 15, 9, 30),
        utc(2026, 3, 15, 9, 29),
        utc(2026, 2, 15, 9, 30),
        utc(2026, 3, 15, 9, 30),
    ),
    (
        utc(2026, 1, 15, 9, 30),
        utc(2026, 3, 15, 9, 30),
        utc(2026, 3, 15, 9, 30),
        utc(2026, 4, 15, 9, 30),
    ),
    # the 31st becomes the last day of shorter months, and comes back afterwards
    (utc(2026, 1, 31), utc(2026, 2, 28, 1), utc(2026, 2, 28), utc(2026, 3, 31)),
    (utc(2026, 1, 31), utc(2026, 4, 30, 1), utc(2026, 4, 30), utc(2026, 5, 31)),
    (utc(2026, 1, 31), utc(2026, 3, 31), utc(2026, 3, 31), utc(2026, 4, 30)),
    # anchors on the 29th and 30th, leap and common Februaries
    (utc(2027, 12, 29), utc(2028, 2, 29, 5), utc(2028, 2, 29), utc(2028, 3, 29)),
    (utc(2026, 12, 29), utc(2027, 2, 28, 5), utc(2027, 2, 28), utc(2027, 3, 29)),
    (utc(2026, 1, 30), utc(2026, 2, 28, 5), utc(2026, 2, 28), utc(2026, 3, 30)),
    # a leap-day anchor
    (utc(2028, 2, 29), utc(2029, 2, 28, 1), utc(2029, 2, 28), utc(2029, 3, 29)),
    # across the year end
    (utc(2026, 10, 31), utc(2027, 1, 5), utc(2026, 12, 31), utc(2027, 1, 31)),
    # before the anchor: the window that ends at the anchor
    (utc(2026, 5, 10), utc(2026, 5, 1), utc(2026, 4, 10), utc(2026, 5, 10)),
]


@pytest.mark.parametrize(
    ("anchor", "at", "start", "resets"),
    MONTHLY_CASES,
    ids=[f"anchor{c[0]:%Y%m%d}-at{c[1]:%Y%m%d}" for c in MONTHLY_CASES],
)
def test_monthly_window_follows_the_billing_anchor(
    anchor: datetime, at: datetime, start: datetime, resets: datetime
) -> None:
    window = window_for(Period.MONTHLY, at, ZoneInfo("Asia/Tokyo"), anchor)
    assert (window.start, window.resets_at) == (start, resets)
    assert window.start <= at < resets


@pytest.mark.parametrize("period", [Period.OVERALL, Period.CUMULATIVE])
def test_overall_and_cumulative_never_reset(period: Period) -> None:
    window = window_for(period, utc(2031, 7, 1), ZoneInfo("UTC"), ANCHOR)
    assert window.start == EPOCH and window.resets_at is None


def test_add_months_clamps_to_month_end() -> None:
    assert add_months(utc(2026, 1, 31), 1) == utc(2026, 2, 28)
    assert add_months(utc(2026, 1, 31), -2) == utc(2025, 11, 30)
    assert add_months(utc(2026, 1, 31), 13) == utc(2027, 2, 28)


def test_naive_datetimes_and_unknown_zones_are_rejected() -> None:
    with pytest.raises(ValueError, match="aware"):
        window_for(Period.DAILY, datetime(2026, 1, 1), ZoneInfo("UTC"), ANCHOR)
    with pytest.raises(InvalidRequest, match="IANA"):
        tenant_zone("Mars/Olympus")
