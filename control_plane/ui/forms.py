"""The admin forms read into the domain's values, with an error next to each field that
cannot be read; what the form cannot see (a taken name, a trial without days) comes back
from the use case and is put next to its field too."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from billing_core.billing.model import GRANT_OCCASIONS, GrantSpec, PlanSpec
from billing_core.errors import QuotaError
from billing_core.rules.limits import DEFAULT_WARN_AT, Quota
from billing_core.rules.resources import Overage, Period, validate_resource

QUOTA_ROWS_BLANK = 3  # empty quota rows a form offers besides the plan's own
MICROS = 1_000_000


@dataclass(slots=True)
class FormErrors:
    fields: dict[str, str] = field(default_factory=dict)
    general: str = ""

    def __bool__(self) -> bool:
        return bool(self.fields or self.general)

    def add(self, name: str, message: str) -> None:
        self.fields.setdefault(name, message)


def _text(form: Mapping[str, Any], name: str) -> str:
    value = form.get(name, "")
    return value.strip() if isinstance(value, str) else ""


def read_int(form: Mapping[str, Any], name: str, errors: FormErrors, *, default: int = 0) -> int:
    raw = _text(form, name).replace(",", "").replace("_", "")
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        errors.add(name, "Enter a whole number.")
        return default


def read_amount(form: Mapping[str, Any], name: str, errors: FormErrors, scale: int) -> int | None:
    """A money amount in currency units ('20', '19.99') as an integer of 1/scale units."""
    raw = _text(form, name).replace(",", "")
    if not raw:
        return None
    try:
        value = Decimal(raw) * scale
    except InvalidOperation:
        errors.add(name, "Enter an amount like 19.99.")
        return None
    if value != value.to_integral_value() or value < 0:
        errors.add(name, "Enter a positive amount with at most the currency's decimals.")
        return None
    return int(value)


def quota_rows(form: Mapping[str, Any]) -> list[int]:
    """The indexes of the quota rows the form sent."""
    found = set()
    for key in form:
        if key.startswith("quota-") and key.count("-") >= 2:
            try:
                found.add(int(key.split("-")[1]))
            except ValueError:
                continue
    return sorted(found)


def read_plan(form: Mapping[str, Any]) -> tuple[PlanSpec | None, FormErrors]:
    """The plan a plan form describes, or the errors that stop it being read."""
    errors = FormErrors()
    price = read_amount(form, "price", errors, 100)
    quotas: list[Quota] = []
    seen: set[tuple[str, Period]] = set()
    for i in quota_rows(form):
        resource = _text(form, f"quota-{i}-resource")
        if not resource:
            continue  # an empty row
        prefix = f"quota-{i}"
        try:
            validate_resource(resource)
        except QuotaError as exc:
            errors.add(f"{prefix}-resource", exc.message)
            continue
        try:
            period = Period(_text(form, f"{prefix}-period"))
        except ValueError:
            errors.add(f"{prefix}-period", "Choose a period.")
            continue
        limit = read_int(form, f"{prefix}-limit", errors, default=-1)
        if limit < 0:
            errors.add(f"{prefix}-limit", "The limit must be a whole number, 0 or more.")
        warn_raw = _text(form, f"{prefix}-warn_at")
        warn_at = DEFAULT_WARN_AT
        if warn_raw:
            try:
                warn_at = tuple(int(p) for p in warn_raw.replace(" ", "").split(",") if p)
            except ValueError:
                errors.add(f"{prefix}-warn_at", "Enter percentages like 80, 95.")
            if any(not 0 < t <= 100 for t in warn_at):
                errors.add(f"{prefix}-warn_at", "Warnings are percentages from 1 to 100.")
        overage = Overage.WALLET if _text(form, f"{prefix}-overage") == "wallet" else Overage.BLOCK
        if (resource, period) in seen:
            errors.add(f"{prefix}-resource", f"{resource} already has a {period.value} quota.")
        seen.add((resource, period))
        quotas.append(Quota(resource, period, limit, warn_at, overage))
    grants = []
    for on in GRANT_OCCASIONS:
        amount = read_amount(form, f"grant-{on}-amount", errors, MICROS)
        if amount:
            days = read_int(form, f"grant-{on}-days", errors) or None
            grants.append(GrantSpec(on, amount, days))
    if errors:
        return None, errors
    spec = PlanSpec(
        name=_text(form, "name"),
        description=_text(form, "description"),
        price_cents=price or 0,
        currency=(_text(form, "currency") or "usd").lower(),
        interval=_text(form, "interval") or "month",
        stripe_price_id=_text(form, "stripe_price_id") or None,
        active=form.get("active") == "on",
        trial=form.get("trial") == "on",
        trial_days=read_int(form, "trial_days", errors),
        priority=read_int(form, "priority", errors),
        enterprise=form.get("enterprise") == "on",
        unlimited=form.get("unlimited") == "on",
        quotas=tuple(quotas),
        wallet_grants=tuple(grants),
    )
    return (None, errors) if errors else (spec, errors)


# the use case's own refusals, put next to the field they are about
_FIELD_OF = (
    ("name", "name"),
    ("price_cents", "price"),
    ("interval", "interval"),
    ("trial_days", "trial_days"),
    ("wallet grant", "grant-start-amount"),
    ("wallet_grants", "grant-start-amount"),
    ("active name", "name"),
    ("stripe price", "stripe_price_id"),
    ("quota", "quota-0-resource"),
    ("limit of", "quota-0-limit"),
    ("plan_id", "plan_id"),
    ("interval of a plan", "interval"),
)


def refusal(errors: FormErrors, message: str) -> FormErrors:
    """Put the use case's refusal next to the field it is about (or above the form)."""
    lowered = message.lower()
    for words, name in _FIELD_OF:
        if words in lowered:
            errors.add(name, message)
            return errors
    errors.general = message
    return errors


def plan_form_values(spec: PlanSpec | None) -> dict[str, Any]:
    """A form's values for an existing plan (or a new one)."""
    spec = spec or PlanSpec(name="", price_cents=0)
    values: dict[str, Any] = {
        "name": spec.name,
        "description": spec.description,
        "price": f"{Decimal(spec.price_cents) / 100:.2f}",
        "currency": spec.currency,
        "interval": spec.interval,
        "stripe_price_id": spec.stripe_price_id or "",
        "active": spec.active,
        "trial": spec.trial,
        "trial_days": str(spec.trial_days),
        "priority": str(spec.priority),
        "enterprise": spec.enterprise,
        "unlimited": spec.unlimited,
    }
    for i, q in enumerate(spec.quotas):
        values |= {
            f"quota-{i}-resource": q.resource,
            f"quota-{i}-period": q.period.value,
            f"quota-{i}-limit": str(q.limit),
            f"quota-{i}-warn_at": ", ".join(str(t) for t in q.warn_at),
            f"quota-{i}-overage": q.overage.value,
        }
    for g in spec.wallet_grants:
        values[f"grant-{g.on}-amount"] = f"{Decimal(g.amount_micros) / MICROS}"
        values[f"grant-{g.on}-days"] = str(g.expires_after_days or "")
    return values


def echo(form: Mapping[str, Any]) -> dict[str, Any]:
    """The values a refused form sent, to show them again."""
    values: dict[str, Any] = {k: v for k, v in form.items() if isinstance(v, str)}
    for flag in ("active", "trial", "enterprise", "unlimited"):
        values[flag] = form.get(flag) == "on"
    return values


def row_count(values: Mapping[str, Any]) -> int:
    """How many quota rows to draw: the filled ones and a few blank."""
    used = quota_rows(values)
    return (max(used) + 1 if used else 0) + QUOTA_ROWS_BLANK
