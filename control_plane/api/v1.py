"""The /v1 admin and integration API: thin handlers over billing_core's use cases."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator, Mapping
from datetime import datetime, timedelta
from typing import Any

from starlette.responses import StreamingResponse

from billing_core.billing import (
    api_keys,
    audit,
    plans,
    prices,
    subscriptions,
    tenants,
    usage,
    wallet,
)
from billing_core.billing.model import (
    AuditFilter,
    GrantSpec,
    PlanSpec,
    PlanView,
    PriceView,
    RecordFilter,
    quota,
)
from billing_core.quota.engine import QuotaEngine
from billing_core.quota.model import RECORD_FIELDS, UsageRecord
from billing_core.quota.requests import UsageRequest
from billing_core.rules.limits import Quota
from control_plane.api import schemas as s
from control_plane.api.routing import Call, Endpoint


def _grace(call: Call) -> timedelta:
    return timedelta(days=call.settings.past_due_grace_days)


def _quotas(specs: list[s.QuotaSpec]) -> tuple[Quota, ...]:
    return tuple(
        quota(q.resource, q.period, q.limit, overage=q.overage, warn_at=tuple(q.warn_at))
        for q in specs
    )


def _quota_out(q: Quota) -> s.QuotaSpec:
    return s.QuotaSpec(
        resource=q.resource,
        period=q.period.value,
        limit=q.limit,
        warn_at=list(q.warn_at),
        overage=q.overage.value,
    )


def _grants(specs: list[s.WalletGrantSpec]) -> tuple[GrantSpec, ...]:
    return tuple(GrantSpec(g.on, g.amount_micros, g.expires_after_days) for g in specs)


def _plan_out(view: PlanView) -> s.Plan:
    spec = view.spec
    return s.Plan(
        plan_id=view.plan_id,
        name=spec.name,
        description=spec.description,
        price_cents=spec.price_cents,
        currency=spec.currency,
        interval=spec.interval,
        stripe_price_id=spec.stripe_price_id,
        active=spec.active,
        trial=spec.trial,
        trial_days=spec.trial_days,
        priority=spec.priority,
        enterprise=spec.enterprise,
        unlimited=spec.unlimited,
        quotas=[_quota_out(q) for q in spec.quotas],
        wallet_grants=[
            s.WalletGrantSpec(
                on=g.on,  # type: ignore[arg-type]
                amount_micros=g.amount_micros,
                expires_after_days=g.expires_after_days,
            )
            for g in spec.wallet_grants
        ],
        version=view.version,
        subscribers=view.subscribers,
        created_at=view.created_at,
        updated_at=view.updated_at,
    )


# --- plans ---------------------------------------------------------------------------------


async def list_plans(call: Call) -> s.PlanPage:
    q: s.PlanQuery = call.query
    page = await plans.list_plans(call.uow, limit=q.limit, cursor=q.cursor, active=q.active)
    return s.PlanPage(items=[_plan_out(v) for v in page.items], next_cursor=page.next_cursor)


async def create_plan(call: Call) -> s.Plan:
    b: s.PlanCreate = call.body
    spec = PlanSpec(
        name=b.name,
        price_cents=b.price_cents,
        quotas=_quotas(b.quotas),
        description=b.description,
        currency=b.currency,
        interval=b.interval,
        stripe_price_id=b.stripe_price_id,
        active=b.active,
        trial=b.trial,
        trial_days=b.trial_days,
        priority=b.priority,
        enterprise=b.enterprise,
        unlimited=b.unlimited,
        wallet_grants=_grants(b.wallet_grants),
    )
    view = await plans.create_plan(call.uow, call.actor, spec, call.now, b.plan_id)
    return _plan_out(view)


async def get_plan(call: Call) -> s.Plan:
    return _plan_out(await plans.get_plan(call.uow, call.path["plan_id"]))


async def patch_plan(call: Call) -> s.Plan:
    b: s.PlanPatch = call.body
    changes: dict[str, Any] = {
        name: getattr(b, name) for name in b.model_fields_set if getattr(b, name) is not None
    }
    if "quotas" in changes:
        changes["quotas"] = _quotas(b.quotas or [])
    if "wallet_grants" in changes:
        changes["wallet_grants"] = _grants(b.wallet_grants or [])
    view = await plans.update_plan(call.uow, call.actor, call.path["plan_id"], changes, call.now)
    return _plan_out(view)


async def archive_plan(call: Call) -> s.Plan:
    view = await plans.archive_plan(call.uow, call.actor, call.path["plan_id"], call.now)
    return _plan_out(view)


# --- tenants, subscriptions, overrides -------------------------------------------------------


async def list_tenants(call: Call) -> s.TenantPage:
    q: s.PageQuery = call.query
    page = await tenants.list_tenants(call.uow, limit=q.limit, cursor=q.cursor)
    return s.TenantPage(
        items=[s.Tenant.model_validate(t) for t in page.items], next_cursor=page.next_cursor
    )


async def create_tenant(call: Call) -> s.Tenant:
    b: s.TenantCreate = call.body
    view = await tenants.create_tenant(
        call.uow, call.actor, b.tenant_id, b.name, call.now, email=b.email, timezone=b.timezone
    )
    return s.Tenant.model_validate(view)


async def get_tenant(call: Call) -> s.Tenant:
    return s.Tenant.model_validate(await tenants.get_tenant(call.uow, call.path["tenant_id"]))


async def get_subscription(call: Call) -> s.Subscription:
    view = await subscriptions.get_subscription(
        call.uow, call.path["tenant_id"], call.now, _grace(call)
    )
    return s.Subscription.model_validate(view)


async def put_subscription(call: Call) -> s.Subscription:
    b: s.SubscriptionPut = call.body
    view = await subscriptions.assign_plan(
        call.uow, call.actor, call.path["tenant_id"], b.plan_id, call.now, _grace(call)
    )
    return s.Subscription.model_validate(view)


async def start_trial(call: Call) -> s.Subscription:
    b: s.TrialStart = call.body
    view = await subscriptions.start_trial(
        call.uow, call.actor, call.path["tenant_id"], b.plan_id, call.now, _grace(call)
    )
    return s.Subscription.model_validate(view)


async def get_overrides(call: Call) -> s.Overrides:
    found = await tenants.get_overrides(call.uow, call.path["tenant_id"])
    return s.Overrides(quotas=[_quota_out(q) for q in found])


async def put_overrides(call: Call) -> s.Overrides:
    b: s.Overrides = call.body
    found = await tenants.set_overrides(
        call.uow, call.actor, call.path["tenant_id"], _quotas(b.quotas), call.now
    )
    return s.Overrides(quotas=[_quota_out(q) for q in found])


# --- usage -----------------------------------------------------------------------------------


async def get_usage(call: Call) -> s.Usage:
    engine: QuotaEngine = call.request.app.state.engine
    report = await engine.usage(UsageRequest(call.path["tenant_id"]))
    return s.Usage(
        tenant_id=call.path["tenant_id"],
        plan_id=report.plan_id,
        subscription_status=report.subscription_status,
        trial_ends_at=report.trial_ends_at,
        wallet_balance_micros=report.wallet_balance_micros,
        resources=[
            s.ResourceUsage(
                resource=r.resource,
                windows=[
                    s.Window(
                        period=w.period.value,
                        limit=w.limit,
                        used=w.used,
                        remaining=w.remaining,
                        resets_at=w.resets_at,
                        state=w.state.value,
                        unlimited=w.unlimited,
                    )
                    for w in r.windows
                ],
            )
            for r in report.resources
        ],
    )


def _record_filter(call: Call) -> RecordFilter:
    q: s.RecordQuery = call.query
    return RecordFilter(call.path["tenant_id"], q.resource, q.since, q.until)


async def list_usage_records(call: Call) -> s.UsageRecordPage | StreamingResponse:
    flt = _record_filter(call)
    q: s.RecordQuery = call.query
    if _wants_csv(call):
        records = await usage.export_records(call.db, flt)  # checked before the stream starts
        filename = f"usage-{flt.tenant_id}.csv".replace('"', "")
        return StreamingResponse(
            _csv_lines(records),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{filename}"'},
        )
    page = await usage.list_records(call.uow, flt, limit=q.limit, cursor=q.cursor)
    return s.UsageRecordPage(
        items=[s.UsageRecord.model_validate(r) for r in page.items], next_cursor=page.next_cursor
    )


def _wants_csv(call: Call) -> bool:
    accept = call.request.headers.get("accept", "")
    return "text/csv" in accept and "application/json" not in accept


def _csv_cell(value: object) -> object:
    if isinstance(value, Mapping):
        return json.dumps(dict(value), sort_keys=True)
    if isinstance(value, datetime):
        return value.isoformat()
    return "" if value is None else value


async def _csv_lines(records: AsyncIterator[UsageRecord]) -> AsyncIterator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(RECORD_FIELDS)
    batch = 0
    async for row in records:
        writer.writerow([_csv_cell(v) for v in row])
        batch += 1
        if batch >= 500:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
            batch = 0
    yield buffer.getvalue()


async def list_notifications(call: Call) -> s.NotificationPage:
    q: s.PageQuery = call.query
    page = await usage.list_notifications(
        call.uow, call.path["tenant_id"], limit=q.limit, cursor=q.cursor
    )
    return s.NotificationPage(
        items=[s.Notification.model_validate(n) for n in page.items], next_cursor=page.next_cursor
    )


# --- wallet and prices -----------------------------------------------------------------------


async def get_wallet(call: Call) -> s.Wallet:
    q: s.PageQuery = call.query
    view = await wallet.get_wallet(
        call.uow, call.path["tenant_id"], call.now, limit=q.limit, cursor=q.cursor
    )
    return s.Wallet(
        tenant_id=view.tenant_id,
        balance_micros=view.balance_micros,
        held_micros=view.held_micros,
        available_micros=view.available_micros,
        grants=[s.WalletGrant.model_validate(g) for g in view.grants],
        ledger=s.LedgerPage(
            items=[s.LedgerEntry.model_validate(e) for e in view.ledger.items],
            next_cursor=view.ledger.next_cursor,
        ),
    )


async def create_grant(call: Call) -> s.WalletGrant:
    b: s.WalletGrantCreate = call.body
    view = await wallet.grant(
        call.uow,
        call.actor,
        call.path["tenant_id"],
        b.amount_micros,
        b.reason,
        call.now,
        b.expires_at,
    )
    return s.WalletGrant.model_validate(view)


async def list_prices(call: Call) -> s.ModelPricePage:
    q: s.PriceQuery = call.query
    page = await prices.list_prices(
        call.uow, limit=q.limit, cursor=q.cursor, provider=q.provider, model=q.model
    )
    return s.ModelPricePage(
        items=[s.ModelPrice.model_validate(p) for p in page.items], next_cursor=page.next_cursor
    )


async def put_price(call: Call) -> s.ModelPrice:
    b: s.ModelPricePut = call.body
    price = PriceView(
        call.path["provider"],
        call.path["model"],
        b.effective_from or call.now,
        b.input_micros_per_million,
        b.output_micros_per_million,
    )
    view = await prices.set_price(call.uow, call.actor, price, call.now)
    return s.ModelPrice.model_validate(view)


async def list_audit_entries(call: Call) -> s.AuditEntryPage:
    q: s.AuditQuery = call.query
    flt = AuditFilter(q.actor, q.action, q.entity_type, q.entity_id)
    page = await audit.list_entries(call.uow, flt, limit=q.limit, cursor=q.cursor)
    return s.AuditEntryPage(
        items=[s.AuditEntry.model_validate(e) for e in page.items], next_cursor=page.next_cursor
    )


async def list_keys(call: Call) -> s.ApiKeyPage:
    q: s.PageQuery = call.query
    page = await api_keys.list_api_keys(call.uow, limit=q.limit, cursor=q.cursor)
    return s.ApiKeyPage(
        items=[s.ApiKey.model_validate(k) for k in page.items], next_cursor=page.next_cursor
    )


async def create_key(call: Call) -> s.ApiKeyIssued:
    b: s.ApiKeyCreate = call.body
    issued = await api_keys.create_api_key(call.uow, call.actor, b.name, call.now, scope=b.scope)
    return s.ApiKeyIssued(key=issued.key, **s.ApiKey.model_validate(issued.view).model_dump())


async def revoke_key(call: Call) -> s.ApiKey:
    view = await api_keys.revoke_api_key(call.uow, call.actor, call.path["api_key_id"], call.now)
    return s.ApiKey.model_validate(view)


T, P = "/v1/tenants/{tenant_id}", "/v1/plans/{plan_id}"
ENDPOINTS: list[Endpoint] = [
    Endpoint("GET", "/v1/plans", "list_plans", "List plans", "plans", list_plans,
             s.PlanPage, query=s.PlanQuery),
    Endpoint("POST", "/v1/plans", "create_plan", "Create a plan", "plans", create_plan,
             s.Plan, body=s.PlanCreate, status=201, errors=(409,)),
    Endpoint("GET", P, "get_plan", "Get a plan", "plans", get_plan, s.Plan, errors=(404,)),
    Endpoint("PATCH", P, "update_plan", "Change a plan (lists replace)", "plans", patch_plan,
             s.Plan, body=s.PlanPatch, errors=(404, 409)),
    Endpoint("POST", P + "/archive", "archive_plan", "Archive a plan: no new subscribers",
             "plans", archive_plan, s.Plan, errors=(404,)),
    Endpoint("GET", "/v1/tenants", "list_tenants", "List tenants", "tenants", list_tenants,
             s.TenantPage, query=s.PageQuery),
    Endpoint("POST", "/v1/tenants", "create_tenant", "Create a tenant", "tenants",
             create_tenant, s.Tenant, body=s.TenantCreate, status=201, errors=(409,)),
    Endpoint("GET", T, "get_tenant", "Get a tenant", "tenants", get_tenant, s.Tenant,
             errors=(404,)),
    Endpoint("GET", T + "/subscription", "get_subscription",
             "The current subscription, explained", "subscriptions", get_subscription,
             s.Subscription, errors=(404,)),
    Endpoint("PUT", T + "/subscription", "put_subscription",
             "Assign an enterprise or free plan without Stripe", "subscriptions",
             put_subscription, s.Subscription, body=s.SubscriptionPut, errors=(404, 409),
             idempotent=True),
    Endpoint("POST", T + "/trial", "start_trial", "Start the tenant's one trial",
             "subscriptions", start_trial, s.Subscription, body=s.TrialStart, status=201,
             errors=(404, 409), idempotent=True),
    Endpoint("GET", T + "/overrides", "get_overrides", "Per-tenant quota overrides",
             "tenants", get_overrides, s.Overrides, errors=(404,)),
    Endpoint("PUT", T + "/overrides", "put_overrides",
             "Replace the overrides (enterprise plans only)", "tenants", put_overrides,
             s.Overrides, body=s.Overrides, errors=(404, 409)),
    Endpoint("GET", T + "/usage", "get_usage", "Every window of every resource", "usage",
             get_usage, s.Usage, errors=(404,)),
    Endpoint("GET", T + "/usage-records", "list_usage_records",
             "Immutable usage records (Accept: text/csv streams an export)", "usage",
             list_usage_records, s.UsageRecordPage, query=s.RecordQuery, errors=(404,),
             csv=True),
    Endpoint("GET", T + "/notifications", "list_notifications",
             "Threshold crossings and billing events", "usage", list_notifications,
             s.NotificationPage, query=s.PageQuery, errors=(404,)),
    Endpoint("GET", T + "/wallet", "get_wallet", "Balance, grants and ledger", "wallet",
             get_wallet, s.Wallet, query=s.PageQuery, errors=(404,)),
    Endpoint("POST", T + "/wallet/grants", "create_wallet_grant", "Grant credits by hand",
             "wallet", create_grant, s.WalletGrant, body=s.WalletGrantCreate, status=201,
             errors=(404,), idempotent=True),
    Endpoint("GET", "/v1/model-prices", "list_model_prices", "Token prices with history",
             "prices", list_prices, s.ModelPricePage, query=s.PriceQuery),
    Endpoint("PUT", "/v1/model-prices/{provider}/{model}", "put_model_price",
             "Set a model's token price from a moment on", "prices", put_price,
             s.ModelPrice, body=s.ModelPricePut),
    Endpoint("GET", "/v1/audit-log", "list_audit_entries",
             "Who changed what, newest first (filter by actor, action, entity)", "audit",
             list_audit_entries, s.AuditEntryPage, query=s.AuditQuery),
    Endpoint("GET", "/v1/api-keys", "list_api_keys", "API keys, without their secrets",
             "api-keys", list_keys, s.ApiKeyPage, query=s.PageQuery, admin_only=True),
    Endpoint("POST", "/v1/api-keys", "create_api_key",
             "Issue a key (admin or read); the key is in this answer only", "api-keys",
             create_key, s.ApiKeyIssued, body=s.ApiKeyCreate, status=201),
    Endpoint("POST", "/v1/api-keys/{api_key_id}/revoke", "revoke_api_key",
             "Revoke a key at once (its admin sessions end too)", "api-keys", revoke_key,
             s.ApiKey, errors=(404, 409),
             description="A key cannot revoke itself (409): revoke it with another admin key "
             "or the CLI, so that nobody locks themselves out by mistake."),
]  # fmt: skip
