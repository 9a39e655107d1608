"""What the billing pages say: Babel money and dates in the tenant's timezone, one-sentence
billing states, limits in words, the server-drawn chart."""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta

import pytest

from billing_core.billing.model import PlanSpec, SubscriptionView, quota
from billing_core.quota.answers import WindowView
from billing_core.rules.limits import WindowState
from billing_core.rules.resources import Period
from control_plane.ui.charts import daily_bars
from control_plane.ui.formatting import Formats, limit_in_words, negotiate_locale, plan_gains

NOW = datetime(2026, 5, 12, 21, 30, tzinfo=UTC)
GB = Formats("en_GB", "Europe/Berlin", NOW)
US = Formats("en_US", "America/New_York", NOW)
GRACE = timedelta(days=3)
SUB = SubscriptionView(
    tenant_id="t",
    subscription_id="s",
    plan_id="pro",
    plan_name="Pro",
    status="active",
    trial_end=None,
    current_period_start=NOW,
    current_period_end=datetime(2027, 1, 3, 12, tzinfo=UTC),
    cancel_at_period_end=False,
    stripe_customer_id="cus_1",
    stripe_subscription_id="sub_1",
    explanation="",
)


def test_money_and_credits_follow_the_currency_and_the_reader() -> None:
    assert GB.money(2000, "usd") == "US$20.00"
    assert US.money(2000, "usd") == "$20.00"
    assert GB.money(1250, "eur") == "€12.50"
    assert GB.micros(5_000_000, "usd") == "US$5.00"
    assert GB.micros(1_500, "usd") == "US$0.0015"  # sub-cent usage stays visible


def test_dates_are_in_the_tenants_timezone_with_the_year_only_when_another() -> None:
    assert GB.day(NOW) == "12 May"  # 23:30 in Berlin
    assert US.day(NOW) == "May 12"  # 17:30 in New York
    assert GB.day(datetime(2026, 5, 12, 22, 30, tzinfo=UTC)) == "13 May"  # past midnight
    assert GB.day(SUB.current_period_end or NOW) == "3 January 2027"
    assert GB.clock(NOW) == "23:30"


def test_each_billing_state_in_one_sentence() -> None:
    def says(**changes: object) -> str:
        return GB.headline(replace(SUB, **changes), NOW, GRACE)  # type: ignore[arg-type]

    assert says() == "Pro — renews on 3 January 2027"
    assert says(status="trialing", trial_end=NOW + timedelta(days=2, hours=1)) == (
        "Pro trial — 3 days left"
    )
    assert says(status="trialing", trial_end=NOW + timedelta(hours=1)) == "Pro trial — 1 day left"
    assert says(status="past_due", past_due_since=NOW) == (
        "Payment failed on 12 May — update your card by 15 May to keep access"
    )
    assert says(cancel_at_period_end=True) == "Pro — cancels on 3 January 2027"
    assert says(plan_name="Enterprise", enterprise=True, stripe_subscription_id=None) == (
        "Enterprise — contract"
    )
    assert says(status="trial_expired").startswith("Pro trial ended")
    assert says(status="none", plan_id=None) == "No plan yet — choose a plan to start"


def test_limits_in_words_with_units_and_singulars() -> None:
    assert limit_in_words(quota("agents", "cumulative", 1), GB) == "1 agent at a time"
    assert limit_in_words(quota("tokens", "daily", 200_000, overage="wallet"), GB) == (
        "200,000 tokens a day, then paid from credits"
    )
    assert limit_in_words(quota("storage", "cumulative", 5_000_000_000), GB) == (
        "5 GB of storage at a time"
    )
    assert GB.measure("storage", 1_250_000) == "1.2 MB"
    assert GB.measure("storage", 999) == "999 bytes"
    assert limit_in_words(quota("custom:images", "monthly", 30), GB) == "30 images a month"


def test_a_plan_says_what_it_adds_over_the_one_below() -> None:
    free = PlanSpec(name="Free", price_cents=0, quotas=(quota("messages", "daily", 50),))
    pro = PlanSpec(
        name="Pro",
        price_cents=2000,
        quotas=(quota("messages", "daily", 1000), quota("files", "cumulative", 500)),
    )
    assert plan_gains(pro, free, GB) == [
        "More messages a day: 1,000 instead of 50",
        "Adds files: 500 files at a time",
    ]
    assert plan_gains(free, None, GB) == []


def test_resets_in_the_tenants_timezone() -> None:
    window = WindowView(
        Period.DAILY, 50, 50, 0, datetime(2026, 5, 12, 22, tzinfo=UTC), WindowState.EXHAUSTED
    )
    assert GB.resets(window, NOW) == "resets at 00:00 Europe/Berlin"
    monthly = replace(
        window, period=Period.MONTHLY, resets_at=datetime(2026, 5, 31, 22, tzinfo=UTC)
    )
    assert GB.resets(monthly, NOW) == "resets on 1 June at 00:00 Europe/Berlin"
    assert GB.resets(replace(window, period=Period.CUMULATIVE), NOW).startswith("goes down")


@pytest.mark.parametrize(
    ("header", "locale"),
    [("en-GB,en;q=0.8", "en_GB"), ("de-DE,de;q=0.9", "en_US"), ("", "en_US"), ("en-AU", "en_AU")],
)
def test_the_readers_english(header: str, locale: str) -> None:
    assert negotiate_locale(header) == locale


def test_the_chart_has_a_bar_per_day_and_escapes_its_labels() -> None:
    first = date(2026, 5, 1)
    svg = str(
        daily_bars(
            "<b>Tokens</b> per day",
            [(first, 10), (date(2026, 5, 3), 40)],
            first,
            30,
            "tokens",
            GB.short_day,
        )
    )
    assert svg.count("<rect") == 30
    assert "<title>3 May: 40 tokens</title>" in svg and ">30 May</text>" in svg
    assert US.short_day(first) == "May 1"
    assert "<b>" not in svg and "&lt;b&gt;" in svg
    assert 'aria-label="&lt;b&gt;Tokens&lt;/b&gt; per day: 50 tokens in 30 days"' in svg
    heights = [float(h) for h in re.findall(r'height="([\d.]+)"><title>', svg)]
    assert heights[2] == max(heights) and heights[1] == 0 and heights[0] == pytest.approx(29.0)
