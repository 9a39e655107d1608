"""What the pages say: money in the plan's currency and dates in the tenant's timezone
(Babel, in the reader's English), a billing state in one sentence, limits in words."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from babel import Locale
from babel.dates import format_date, format_datetime, format_time
from babel.numbers import format_currency, format_decimal

from billing_core.billing.model import PlanSpec, SubscriptionView
from billing_core.quota.answers import WindowView
from billing_core.rules.limits import Quota
from billing_core.rules.resources import Overage, Period

SUPPORTED_LOCALES = ("en_US", "en_GB", "en_IE", "en_AU", "en_CA")
_PER = {
    Period.DAILY: "a day",
    Period.WEEKLY: "a week",
    Period.MONTHLY: "a month",
    Period.OVERALL: "in total",
    Period.CUMULATIVE: "at a time",
}
_WINDOW = {
    Period.DAILY: "today",
    Period.WEEKLY: "this week",
    Period.MONTHLY: "this month",
    Period.OVERALL: "in total",
    Period.CUMULATIVE: "in use",
}


_BYTE_UNITS = ("bytes", "kB", "MB", "GB", "TB", "PB")
_SINGULAR = {
    "tokens": "token",
    "messages": "message",
    "agents": "agent",
    "bots": "bot",
    "boards": "board",
    "companions": "companion",
    "files": "file",
    "research_runs": "research run",
    "tool_calls": "tool call",
}


def negotiate_locale(accept_language: str) -> str:
    """The reader's English (dates and money are written the way they read them)."""
    wanted = [part.split(";")[0].strip().replace("-", "_") for part in accept_language.split(",")]
    found = Locale.negotiate([w for w in wanted if w], list(SUPPORTED_LOCALES), sep="_")
    return str(found) if found else "en_US"


@dataclass(frozen=True, slots=True)
class Formats:
    """Formatting for one reader (locale) of one tenant (timezone)."""

    locale: str
    timezone: str
    today: datetime  # the reader's now: a date in another year shows its year

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def money(self, cents: int, currency: str) -> str:
        return format_currency(cents / 100, currency.upper(), locale=self.locale)

    def micros(self, micros: int, currency: str = "usd") -> str:
        """Wallet credits (1 unit = 1,000,000 micros), to the cent or finer when small."""
        value = micros / 1_000_000
        if value and abs(value) < 0.01:
            return format_currency(
                value,
                currency.upper(),
                format="¤#,##0.######",
                locale=self.locale,
                currency_digits=False,
            )
        return format_currency(value, currency.upper(), locale=self.locale)

    def number(self, value: int) -> str:
        return format_decimal(value, locale=self.locale)

    def measure(self, resource: str, value: int) -> str:
        """An amount of a resource as a figure: bytes of storage in kB/MB/GB (decimal),
        anything else as a number."""
        if resource != "storage":
            return self.number(value)
        size, step = float(value), 0
        while abs(size) >= 1000 and step < len(_BYTE_UNITS) - 1:
            size, step = size / 1000, step + 1
        return f"{format_decimal(size, '#,##0.#', locale=self.locale)} {_BYTE_UNITS[step]}"

    def quantity(self, resource: str, value: int) -> str:
        """'1 agent', '1,000 messages', '5 GB of storage'."""
        if resource == "storage":
            return f"{self.measure(resource, value)} of storage"
        name = resource_name(resource)
        noun = _SINGULAR.get(resource, name) if value == 1 else name
        return f"{self.number(value)} {noun}"

    def day(self, at: datetime) -> str:
        """'3 January' (or 'January 3'), with the year when it is not this year's."""
        local = at.astimezone(self.zone)
        now = self.today.astimezone(self.zone)
        pattern = "d MMMM" if local.year == now.year else "d MMMM y"
        if self.locale in ("en_US", "en_CA"):
            pattern = "MMMM d" if local.year == now.year else "MMMM d, y"
        return format_date(local, pattern, locale=self.locale)

    def short_day(self, day: date) -> str:
        """'3 Jan' (or 'Jan 3'): a day on a chart."""
        return format_date(
            day, "MMM d" if self.locale in ("en_US", "en_CA") else "d MMM", locale=self.locale
        )

    def moment(self, at: datetime) -> str:
        return format_datetime(at, "medium", tzinfo=self.zone, locale=self.locale)

    def clock(self, at: datetime) -> str:
        return format_time(at, "HH:mm", tzinfo=self.zone, locale=self.locale)

    def resets(self, view: WindowView, now: datetime) -> str:
        """When a window starts again, in the tenant's timezone."""
        if view.period is Period.CUMULATIVE:
            return "goes down as you free some"
        if view.resets_at is None:
            return "never resets"
        if view.resets_at - now <= timedelta(days=1):
            return f"resets at {self.clock(view.resets_at)} {self.timezone}"
        return (
            f"resets on {self.day(view.resets_at)} at {self.clock(view.resets_at)} {self.timezone}"
        )

    def price(self, spec: PlanSpec) -> str:
        if spec.enterprise:
            return "By contract"
        if spec.price_cents == 0:
            return "Free"
        return f"{self.money(spec.price_cents, spec.currency)} a {spec.interval}"

    def headline(self, sub: SubscriptionView, now: datetime, grace: timedelta) -> str:
        """The plan and its state in one sentence."""
        name = sub.plan_name or "No plan"
        status = sub.status
        if status == "none" or sub.plan_id is None:
            return "No plan yet — choose a plan to start"
        if status == "trialing":
            left = _days_left(sub.trial_end, now)
            return f"{name} trial — {left} left" if left else f"{name} trial — ends today"
        if status == "trial_expired":
            return f"{name} trial ended — choose a plan to continue"
        if status == "past_due":
            since = _past_due_since(sub, now)
            return (
                f"Payment failed on {self.day(since)} — update your card by "
                f"{self.day(since + grace)} to keep access"
            )
        if status in ("unpaid", "incomplete", "incomplete_expired"):
            return f"{name} — payment overdue: update your card to restore access"
        if status == "canceled":
            return f"{name} ended — choose a plan to continue"
        if sub.cancel_at_period_end and sub.current_period_end:
            return f"{name} — cancels on {self.day(sub.current_period_end)}"
        if sub.current_period_end and sub.stripe_subscription_id:
            return f"{name} — renews on {self.day(sub.current_period_end)}"
        return f"{name} — contract" if sub.enterprise else f"{name} — no payment needed"


def _days_left(end: datetime | None, now: datetime) -> str:
    if end is None:
        return ""
    days = (end - now).days + (1 if (end - now) % timedelta(days=1) else 0)
    if days <= 0:
        return ""
    return "1 day" if days == 1 else f"{days} days"


def _past_due_since(sub: SubscriptionView, now: datetime) -> datetime:
    return sub.past_due_since or now


def resource_name(resource: str) -> str:
    """'research_runs' → 'research runs', 'custom:images' → 'images'."""
    return resource.removeprefix("custom:").replace("_", " ")


def limit_in_words(q: Quota, f: Formats) -> str:
    """'200,000 tokens a day, then paid from credits'."""
    text = f"{f.quantity(q.resource, q.limit)} {_PER[q.period]}"
    return text + (", then paid from credits" if q.overage is Overage.WALLET else "")


def window_label(view: WindowView, resource: str) -> str:
    return f"{resource_name(resource).capitalize()} {_WINDOW[view.period]}"


def percent(view: WindowView) -> int:
    if view.unlimited or view.limit <= 0:
        return 100 if view.limit <= 0 and not view.unlimited else 0
    return min(100, view.used * 100 // view.limit)


def plan_gains(plan: PlanSpec, below: PlanSpec | None, f: Formats) -> list[str]:
    """What a plan adds over the one below it, in words."""
    if below is None:
        return []
    if plan.unlimited and not below.unlimited:
        return ["No limits at all"]
    lower = {(q.resource, q.period): q for q in below.quotas}
    gains = []
    for q in plan.quotas:
        was = lower.get((q.resource, q.period))
        if was is None and not any(r == q.resource for r, _ in lower):
            gains.append(f"Adds {resource_name(q.resource)}: {limit_in_words(q, f)}")
        elif was is not None and q.limit > was.limit:
            gains.append(
                f"More {resource_name(q.resource)} {_PER[q.period]}: "
                f"{f.measure(q.resource, q.limit)} instead of {f.measure(q.resource, was.limit)}"
            )
    return gains
