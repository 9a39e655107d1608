"""Window arithmetic: where the current window of a period starts and when it resets.

Pure functions of (period, instant, tenant timezone, billing anchor); no clock reads.
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from functools import cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from billing_core.errors import InvalidRequest
from billing_core.rules.resources import Period

# Overall and cumulative windows never reset; they all share this start.
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Window:
    period: Period
    start: datetime
    resets_at: datetime | None


@cache
def known_timezones() -> tuple[str, ...]:
    """The IANA zone names a tenant may have (the machine's tz database)."""
    return tuple(sorted(available_timezones()))


def tenant_zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidRequest(f"unknown IANA timezone {name!r}") from None


def _local_midnight(day: date, tz: ZoneInfo) -> datetime:
    # fold=0 picks the first midnight when it happens twice; a skipped midnight maps to
    # the instant of the transition, which is when that local day really starts.
    return datetime.combine(day, time(0), tzinfo=tz).astimezone(UTC)


def add_months(anchor: datetime, months: int) -> datetime:
    """The anchor moved by whole months; the 31st becomes the last day of shorter months."""
    index = anchor.year * 12 + (anchor.month - 1) + months
    year, month = divmod(index, 12)
    month += 1
    day = min(anchor.day, calendar.monthrange(year, month)[1])
    return anchor.replace(year=year, month=month, day=day)


def window_for(period: Period, at: datetime, tz: ZoneInfo, anchor: datetime) -> Window:
    """The window of `period` that contains instant `at`.

    daily/weekly: midnight (Monday for weekly, ISO weeks) in the tenant's timezone;
    monthly: the billing-cycle anchor repeated monthly (UTC);
    overall/cumulative: one window forever.
    """
    if at.tzinfo is None:
        raise ValueError("window_for needs an aware datetime")
    if period is Period.DAILY or period is Period.WEEKLY:
        local_day = at.astimezone(tz).date()
        if period is Period.WEEKLY:
            local_day -= timedelta(days=local_day.weekday())
            length = 7
        else:
            length = 1
        return Window(
            period,
            _local_midnight(local_day, tz),
            _local_midnight(local_day + timedelta(days=length), tz),
        )
    if period is Period.MONTHLY:
        anchor = anchor.astimezone(UTC)
        at_utc = at.astimezone(UTC)
        months = (at_utc.year - anchor.year) * 12 + (at_utc.month - anchor.month)
        start = add_months(anchor, months)
        if start > at_utc:
            months -= 1
            start = add_months(anchor, months)
        return Window(period, start, add_months(anchor, months + 1))
    return Window(period, EPOCH, None)
