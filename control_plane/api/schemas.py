"""Request and response bodies (pydantic v2). The OpenAPI document is generated from these."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
)

from billing_core.rules.periods import known_timezones

INT64_MAX = 2**63 - 1


def _whole(value: Any) -> Any:
    """JSON has one number type: 5.0 is the integer 5 (as JSON Schema has it); 5.5 stays
    refused, and so does "5"."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    return value


WHOLE = BeforeValidator(_whole)  # after Field(...): the constraints stay in the schema
# ECMA-262's white space (what JSON Schema patterns mean by \s), spelled out: the
# validator's own \s would also count U+0085, and the two would disagree
SPACE = " \t\n\v\f\r\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"


def _zone_names(schema: dict[str, Any]) -> None:
    schema["enum"] = list(known_timezones())


def _one_of_each_kind(schema: dict[str, Any]) -> None:
    """At most one wallet grant per `on` (JSON Schema's maxContains)."""
    schema["allOf"] = [
        {"contains": {"properties": {"on": {"const": on}}}, "minContains": 0, "maxContains": 1}
        for on in ("start", "renewal", "upgrade")
    ]


# PostgreSQL text cannot hold NUL; refusing it here keeps such input a 422, not a 500
Text = Annotated[str, StringConstraints(max_length=2000, pattern=r"^[^\x00]*$")]
Name = Annotated[
    str,
    StringConstraints(min_length=1, max_length=200, pattern=rf"^[^\x00]*[^{SPACE}\x00][^\x00]*$"),
]
Id = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")]
TenantId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[^\x00/]+$")]
Count = Annotated[int, Field(ge=0, le=INT64_MAX), WHOLE]
Micros = Annotated[
    int, Field(ge=1, le=INT64_MAX, description="1 currency unit = 1,000,000 micros"), WHOLE
]
# a resource's name: a built-in one or custom:<name>
_RESOURCE = (
    r"(tokens|messages|agents|bots|boards|companions|files|storage"
    r"|research_runs|tool_calls|media_processing|custom:[a-z0-9][a-z0-9_.-]{0,62})"
)
Resource = Annotated[str, StringConstraints(pattern=rf"^{_RESOURCE}$")]
_ISO = re.compile(r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}")


def _iso_only(value: object) -> object:
    """Query strings: only ISO 8601 instants (pydantic would also take Unix seconds)."""
    if isinstance(value, str) and not _ISO.match(value):
        raise ValueError("use an ISO 8601 date-time with an offset, e.g. 2026-03-01T00:00:00Z")
    return value


QueryInstant = Annotated[AwareDatetime, BeforeValidator(_iso_only)]
PeriodName = Literal["daily", "weekly", "monthly", "overall", "cumulative"]


class Body(BaseModel):
    """A request body: parsed from JSON in strict mode (no "5" → 5, no false → 0)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Out(BaseModel):
    model_config = ConfigDict(from_attributes=True, frozen=True)


# --- plans -------------------------------------------------------------------------------


class QuotaSpec(Body):
    resource: Resource
    period: PeriodName
    limit: Count
    warn_at: list[Annotated[int, Field(ge=1, le=100), WHOLE]] = Field(
        default=[80, 95], max_length=10, description="soft-warning thresholds in percent"
    )
    overage: Literal["block", "wallet"] = Field(
        default="block", description="past the limit: block, or pay from the wallet"
    )


class WalletGrantSpec(Body):
    on: Literal["start", "renewal", "upgrade"]
    amount_micros: Micros
    expires_after_days: Annotated[int, Field(ge=1, le=36_500), WHOLE] | None = None


class PlanFields(Body):
    description: Text = ""
    price_cents: Count = 0
    currency: Annotated[str, StringConstraints(pattern=r"^[a-z]{3}$")] = "usd"
    interval: Literal["month", "year"] = "month"
    stripe_price_id: (
        Annotated[str, StringConstraints(max_length=255, pattern=r"^[^\x00]*$")] | None
    ) = None
    active: bool = True
    trial: bool = False
    trial_days: Annotated[int, Field(ge=0, le=365), WHOLE] = 0
    priority: Annotated[int, Field(ge=-1_000_000, le=1_000_000), WHOLE] = 0
    enterprise: bool = False
    unlimited: bool = Field(default=False, description="no quotas at all (no-quota plan)")
    quotas: list[QuotaSpec] = Field(default=[], max_length=200)
    wallet_grants: list[WalletGrantSpec] = Field(
        default=[], max_length=3, json_schema_extra=_one_of_each_kind
    )


class PlanCreate(PlanFields):
    plan_id: Id | None = Field(default=None, description="chosen id; generated when absent")
    name: Name


class PlanPatch(Body):
    name: Name | None = None
    description: Text | None = None
    price_cents: Count | None = None
    currency: Annotated[str, StringConstraints(pattern=r"^[a-z]{3}$")] | None = None
    interval: Literal["month", "year"] | None = None
    stripe_price_id: (
        Annotated[str, StringConstraints(max_length=255, pattern=r"^[^\x00]*$")] | None
    ) = None
    active: bool | None = None
    trial: bool | None = None
    trial_days: Annotated[int, Field(ge=0, le=365), WHOLE] | None = None
    priority: Annotated[int, Field(ge=-1_000_000, le=1_000_000), WHOLE] | None = None
    enterprise: bool | None = None
    unlimited: bool | None = None
    quotas: list[QuotaSpec] | None = Field(default=None, max_length=200)
    wallet_grants: list[WalletGrantSpec] | None = Field(
        default=None, max_length=3, json_schema_extra=_one_of_each_kind
    )


class Plan(Out):
    plan_id: str
    name: str
    description: str
    price_cents: int
    currency: str
    interval: str
    stripe_price_id: str | None
    active: bool
    trial: bool
    trial_days: int
    priority: int
    enterprise: bool
    unlimited: bool
    quotas: list[QuotaSpec]
    wallet_grants: list[WalletGrantSpec]
    version: int = Field(description="bumped on every change")
    subscribers: int = Field(description="tenants whose current subscription is this plan")
    created_at: datetime
    updated_at: datetime


class PlanPage(Out):
    items: list[Plan]
    next_cursor: str | None


# --- tenants and subscriptions -----------------------------------------------------------


class TenantCreate(Body):
    tenant_id: TenantId
    name: Name
    email: Annotated[
        str, StringConstraints(max_length=320, pattern=rf"^$|^[^@{SPACE}\x00]+@[^@{SPACE}\x00]+$")
    ] = ""
    timezone: Annotated[
        str,
        StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_+/-]+$"),
        Field(json_schema_extra=_zone_names, description="an IANA zone name"),
    ] = "UTC"


class Tenant(Out):
    tenant_id: str
    name: str
    email: str
    timezone: str
    trial_used_at: datetime | None
    created_at: datetime


class TenantPage(Out):
    items: list[Tenant]
    next_cursor: str | None


class Subscription(Out):
    tenant_id: str
    subscription_id: str | None
    plan_id: str | None
    plan_name: str | None
    status: str = Field(description="trialing, active, past_due, … or none")
    trial_end: datetime | None
    current_period_start: datetime | None
    current_period_end: datetime | None
    cancel_at_period_end: bool
    stripe_customer_id: str | None
    stripe_subscription_id: str | None
    explanation: str = Field(description="the state in one or two plain sentences")
    past_due_since: datetime | None = Field(
        default=None, description="when the failed payment happened (past_due only)"
    )


class SubscriptionPut(Body):
    plan_id: Id


class TrialStart(Body):
    plan_id: Id


class Overrides(Body):
    quotas: list[QuotaSpec] = Field(max_length=200)


# --- usage ---------------------------------------------------------------------------------


class Window(Out):
    period: str
    limit: int
    used: int
    remaining: int
    resets_at: datetime | None
    state: str
    unlimited: bool


class ResourceUsage(Out):
    resource: str
    windows: list[Window]


class Usage(Out):
    tenant_id: str
    plan_id: str
    subscription_status: str
    trial_ends_at: datetime | None
    wallet_balance_micros: int
    resources: list[ResourceUsage]


class UsageRecord(Out):
    usage_record_id: str
    occurred_at: datetime
    resource: str
    amount: int
    kind: str
    request_id: str | None
    reservation_id: str | None
    plan_id: str | None
    provider: str | None
    model: str | None
    input_tokens: int
    output_tokens: int
    cost_micros: int
    wallet_charged_micros: int
    over_limit: bool
    labels: dict[str, Any]


class UsageRecordPage(Out):
    items: list[UsageRecord]
    next_cursor: str | None


# --- wallet and prices ---------------------------------------------------------------------


class WalletGrant(Out):
    grant_id: str
    source: str
    amount_micros: int
    remaining_micros: int
    expires_at: datetime | None
    expired: bool
    reason: str
    created_at: datetime


class LedgerEntry(Out):
    entry_id: int
    grant_id: str
    kind: str
    delta_micros: int
    usage_record_id: str | None
    reason: str
    created_at: datetime


class LedgerPage(Out):
    items: list[LedgerEntry]
    next_cursor: str | None


class Wallet(Out):
    tenant_id: str
    balance_micros: int
    held_micros: int = Field(description="set aside for live reservations")
    available_micros: int
    grants: list[WalletGrant]
    ledger: LedgerPage


class WalletGrantCreate(Body):
    amount_micros: Micros
    reason: Annotated[
        str,
        StringConstraints(
            min_length=1, max_length=500, pattern=rf"^[^\x00]*[^{SPACE}\x00][^\x00]*$"
        ),
    ]
    expires_at: AwareDatetime | None = None


class ModelPrice(Out):
    provider: str
    model: str
    effective_from: datetime
    input_micros_per_million: int
    output_micros_per_million: int


class ModelPricePage(Out):
    items: list[ModelPrice]
    next_cursor: str | None


class ModelPricePut(Body):
    input_micros_per_million: Count
    output_micros_per_million: Count
    effective_from: AwareDatetime | None = Field(
        default=None, description="when the price starts to apply; now when absent"
    )


class Notification(Out):
    notification_id: int
    kind: str
    message: str
    details: dict[str, Any]
    created_at: datetime


class NotificationPage(Out):
    items: list[Notification]
    next_cursor: str | None


# --- payments ---------------------------------------------------------------------------


class CheckoutCreate(Body):
    plan_id: Id


class PlanChange(Body):
    plan_id: Id


class CancelChange(Body):
    cancel_at_period_end: bool = Field(description="true cancels at period end, false resumes")


class EmptyBody(Body):
    pass


class BillingLinkCreate(Body):
    return_url: str | None = Field(
        default=None,
        max_length=2000,
        # no brackets in the host: an IPv6 literal is no address for an app's settings page
        pattern=rf"^[hH][tT][tT][pP][sS]?://[^/?#\[\]{SPACE}\x00]+([/?#][^{SPACE}\x00]*)?$",
        description="where the billing pages' 'Back to the app' link leads (http or https)",
    )
    expires_in_seconds: Annotated[int, WHOLE] = Field(
        default=900, ge=60, le=86_400, description="how long the link may be opened"
    )
    opens: str = Field(
        default="overview",
        max_length=80,
        pattern=rf"^(overview|plans|limits/{_RESOURCE})$",
        description="the billing page the link opens: overview, plans, or limits/<resource> "
        "(why a call was refused and what would allow more: for a denial's user)",
    )

    @field_validator("return_url")
    @classmethod
    def _web_address(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError("return_url must be an http or https address")
        return value


class BillingLink(Out):
    url: str = Field(description="send the user's browser here: it opens the billing pages")
    expires_at: datetime


class SessionLink(Out):
    session_id: str
    url: str = Field(description="send the browser here")


class WebhookEvent(Out):
    event_id: str
    type: str
    status: str = Field(description="received, processed, failed or ignored")
    attempts: int
    last_error: str | None
    received_at: datetime
    processed_at: datetime | None


class WebhookEventPage(Out):
    items: list[WebhookEvent]
    next_cursor: str | None


class ApiKey(Out):
    api_key_id: str
    name: str
    prefix: str = Field(description="the key's first characters, to recognise it")
    scope: str = Field(description="admin: everything; read: GET requests only")
    created_at: datetime
    revoked_at: datetime | None


class ApiKeyIssued(ApiKey):
    key: str = Field(description="the key itself: shown this once, stored only as a hash")


class ApiKeyPage(Out):
    items: list[ApiKey]
    next_cursor: str | None


class ApiKeyCreate(Body):
    name: Annotated[
        str,
        StringConstraints(
            min_length=1, max_length=128, pattern=rf"^[^\x00]*[^{SPACE}\x00][^\x00]*$"
        ),
    ]
    scope: Literal["admin", "read"] = "admin"


class AuditEntry(Out):
    audit_id: int
    actor: str = Field(description="the API key id (or 'cli', 'stripe', 'system')")
    action: str
    entity_type: str
    entity_id: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    created_at: datetime


class AuditEntryPage(Out):
    items: list[AuditEntry]
    next_cursor: str | None


# --- query strings -------------------------------------------------------------------------


class PageQuery(BaseModel):
    limit: Annotated[int, Field(ge=1, le=500), WHOLE] = 50
    cursor: Annotated[str, StringConstraints(max_length=500)] | None = None


class PlanQuery(PageQuery):
    active: bool | None = None


class RecordQuery(PageQuery):
    resource: Resource | None = None
    since: QueryInstant | None = None
    until: QueryInstant | None = None


class PriceQuery(PageQuery):
    provider: Annotated[str, StringConstraints(max_length=128)] | None = None
    model: Annotated[str, StringConstraints(max_length=128)] | None = None


class AuditQuery(PageQuery):
    actor: Annotated[str, StringConstraints(max_length=200)] | None = None
    action: Annotated[str, StringConstraints(max_length=200)] | None = None
    entity_type: Annotated[str, StringConstraints(max_length=200)] | None = None
    entity_id: Annotated[str, StringConstraints(max_length=200)] | None = None


class WebhookQuery(PageQuery):
    status: Literal["received", "processed", "failed", "ignored"] | None = None


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str
    title: str
    status: int
    detail: str
    errors: list[dict[str, Any]] | None = None
