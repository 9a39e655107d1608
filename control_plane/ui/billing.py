"""The billing pages of one tenant, reached through a billing link: the overview, the plan
picker, the change confirmation, the checkout return, the limit page. Every state comes
from the server's own records or the payment provider; the browser changes nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any
from urllib.parse import quote

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from billing_core.billing import payments, plans, subscriptions, tenants, usage, wallet
from billing_core.billing.model import PlanView, SubscriptionView, TenantView
from billing_core.billing.provider import BillingAdapter, ProviderInvoice
from billing_core.db.unit_of_work import Database
from billing_core.errors import Conflict, NotFound, QuotaError
from billing_core.quota.answers import UsageReport
from billing_core.quota.engine import QuotaEngine
from billing_core.quota.requests import ConsumeRequest, UsageRequest
from billing_core.rules.limits import Reason
from billing_core.rules.resources import validate_resource
from control_plane.ui import formatting as fmt
from control_plane.ui.charts import daily_bars
from control_plane.ui.web import BillingSession, Pages

log = structlog.get_logger()
CHART_DAYS = 30
NOTICES = {
    "changed": "Your plan has changed. The new limits apply now.",
    "assigned": "You are on the new plan now.",
    "portal": "Changes you made in the billing portal show here within seconds.",
    "canceled": "Checkout canceled: nothing was charged and your plan is unchanged.",
}
Handler = Callable[[Request, BillingSession], Awaitable[Response]]


@dataclass(frozen=True, slots=True)
class Banner:
    kind: str  # info, warning, blocking
    text: str
    action: str = ""  # "plans" or "portal"


def _state(request: Request) -> tuple[Pages, Database, QuotaEngine, BillingAdapter]:
    app = request.app.state
    return app.pages, app.db, app.engine, app.billing


def _grace(pages: Pages) -> timedelta:
    return timedelta(days=pages.settings.past_due_grace_days)


def page(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """A billing page: its tenant from the session (none: the link-expired page), its
    forms' token checked on POST."""

    async def endpoint(request: Request) -> Response:
        pages: Pages = request.app.state.pages
        session = pages.billing_session(request)
        if session is None:
            notice = "canceled" if request.query_params.get("checkout") == "canceled" else ""
            return pages.no_session(request, NOTICES.get(notice, ""))
        if request.method == "POST":
            form = await request.form()
            if not pages.form_token_valid(session.session_id, form.get("csrf")):
                return pages.forbidden(request)
        try:
            return await handler(request, session)
        except NotFound:
            return pages.no_session(request)  # the tenant is gone: nothing to show

    return endpoint


def banners(sub: SubscriptionView, f: fmt.Formats, now: datetime, grace: timedelta) -> list[Banner]:
    """What the owner must know before anything else on every billing page."""
    found = []
    if sub.status == "trialing" and sub.trial_end and sub.trial_end - now <= timedelta(days=3):
        found.append(
            Banner(
                "warning",
                f"Your trial ends on {f.day(sub.trial_end)}. Choose a plan to keep your limits.",
                "plans",
            )
        )
    if sub.status in ("trial_expired", "canceled", "none", "incomplete_expired"):
        text = {
            "trial_expired": "Your trial has ended: usage is blocked until you choose a plan.",
            "canceled": "Your subscription has ended: usage is blocked until you choose a plan.",
        }.get(sub.status, "You have no plan yet: choose one to start.")
        found.append(Banner("blocking", text, "plans"))
    if sub.status == "past_due":
        since = sub.past_due_since or now
        found.append(
            Banner(
                "warning",
                f"The payment of {f.day(since)} failed. Update your card by "
                f"{f.day(since + grace)} to keep access.",
                "portal",
            )
        )
    if sub.status in ("unpaid", "incomplete"):
        found.append(
            Banner(
                "blocking",
                "Your last payment has not gone through: usage is "
                "blocked until you update your card.",
                "portal",
            )
        )
    if sub.cancel_at_period_end and sub.current_period_end and sub.status != "canceled":
        found.append(
            Banner(
                "info",
                f"Your subscription ends on {f.day(sub.current_period_end)}. You "
                "can resume it in the billing portal until then.",
                "portal",
            )
        )
    return found


@dataclass(frozen=True, slots=True)
class Frame:
    """What every billing page shows around its own part."""

    tenant: TenantView
    subscription: SubscriptionView
    plan: PlanView | None
    formats: fmt.Formats
    headline: str
    banners: list[Banner]
    form_token: str
    back_url: str | None  # the platform's page the billing link named

    def context(self, **more: Any) -> dict[str, Any]:
        return {"frame": self, "f": self.formats, **more}


async def _frame(request: Request, session: BillingSession) -> Frame:
    pages, db, _, _ = _state(request)
    now = pages.clock.now()
    async with db.transaction() as uow:
        tenant = await tenants.get_tenant(uow, session.tenant_id)
        sub = await subscriptions.get_subscription(uow, tenant.tenant_id, now, _grace(pages))
        plan = await plans.get_plan(uow, sub.plan_id) if sub.plan_id else None
    f = fmt.Formats(pages.locale(request), tenant.timezone, now)
    return Frame(
        tenant,
        sub,
        plan,
        f,
        f.headline(sub, now, _grace(pages)),
        banners(sub, f, now, _grace(pages)),
        pages.form_token(session.session_id),
        session.return_url,
    )


# --- the overview ------------------------------------------------------------------------


async def overview(request: Request, session: BillingSession) -> Response:
    pages, db, engine, adapter = _state(request)
    frame = await _frame(request, session)
    now = pages.clock.now()
    tenant_id = frame.tenant.tenant_id
    async with db.transaction() as uow:
        purse = await wallet.get_wallet(uow, tenant_id, now, limit=8)
        records = await usage.latest_records(uow, tenant_id, 10)
        days = await usage.daily_usage(uow, tenant_id, frame.tenant.timezone, now, CHART_DAYS)
        customer = await uow.tenants.provider_customer(tenant_id)
    report = await engine.usage(UsageRequest(tenant_id))
    bills = await _invoices(adapter, customer)
    first = (now.astimezone(frame.formats.zone) - timedelta(days=CHART_DAYS - 1)).date()
    charts = {
        resource: daily_bars(
            f"{fmt.resource_name(resource).capitalize()} per day",
            _days_of(days, resource),
            first,
            CHART_DAYS,
            "bytes of storage" if resource == "storage" else fmt.resource_name(resource),
            frame.formats.short_day,
        )
        for resource in sorted({d.resource for d in days if d.amount})  # those with usage
    }
    grants = sorted(
        (g for g in purse.grants if not g.expired and g.remaining_micros > 0),
        key=lambda g: (g.expires_at is None, g.expires_at or now),
    )
    notice = NOTICES.get(
        request.query_params.get("notice", "") or request.query_params.get("from", ""), ""
    )
    return pages.render(
        request,
        "billing/overview.html",
        **frame.context(
            report=report,
            meters=_meters(report),
            charts=charts,
            wallet=purse,
            grants=grants,
            records=records,
            invoices=bills,
            notice=notice,
            now=now,
            currency=frame.plan.spec.currency if frame.plan else "usd",
        ),
    )


def _days_of(days: list[Any], resource: str) -> list[tuple[date, int]]:
    return [(d.day, d.amount) for d in days if d.resource == resource]


def _meters(report: UsageReport) -> list[tuple[str, Any]]:
    return [(r.resource, w) for r in report.resources for w in r.windows]


async def _invoices(adapter: BillingAdapter, customer: str | None) -> list[ProviderInvoice] | None:
    """The provider's invoices; None when it cannot be asked right now."""
    if customer is None:
        return []
    try:
        return await asyncio.wait_for(adapter.list_invoices(customer, 12), timeout=5)
    except (QuotaError, TimeoutError) as exc:
        log.warning("invoices_unavailable", error=str(exc)[:200])
        return None


# --- plans, checkout, changes ---------------------------------------------------------------


async def plan_picker(request: Request, session: BillingSession) -> Response:
    pages, db, _, _ = _state(request)
    frame = await _frame(request, session)
    async with db.transaction() as uow:
        offered = await _offered_plans(uow, frame)
    paid = frame.subscription.stripe_subscription_id is not None and frame.subscription.status in (
        subscriptions.LIVE
    )
    rows = []
    below: PlanView | None = None
    for plan in offered:
        current = plan.plan_id == frame.subscription.plan_id and frame.subscription.status in (
            "active",
            "trialing",
            "past_due",
        )
        action = _plan_action(plan, frame, paid, current)
        rows.append(
            {
                "plan": plan,
                "price": frame.formats.price(plan.spec),
                "limits": [fmt.limit_in_words(q, frame.formats) for q in plan.spec.quotas],
                "gains": fmt.plan_gains(plan.spec, below.spec if below else None, frame.formats),
                "current": current,
                "action": action,
                "trial": plan.spec.trial and frame.tenant.trial_used_at is None and not paid,
            }
        )
        below = plan
    notice = NOTICES["canceled"] if request.query_params.get("checkout") == "canceled" else ""
    error = request.query_params.get("error", "")
    return pages.render(
        request, "billing/plans.html", **frame.context(rows=rows, notice=notice, error=error[:300])
    )


async def _offered_plans(uow: Any, frame: Frame) -> list[PlanView]:
    """The active plans the tenant may pick (self-serve and free), cheapest first, with
    the current plan even when it is archived or a contract."""
    found = [p for p in await plans.all_plans(uow, active=True) if not p.spec.enterprise]
    if frame.plan is not None and all(p.plan_id != frame.plan.plan_id for p in found):
        found.append(frame.plan)
    return sorted(found, key=lambda p: (p.spec.price_cents, -p.spec.priority, p.plan_id))


def _plan_action(plan: PlanView, frame: Frame, paid: bool, current: bool) -> dict[str, str]:
    """The button a plan gets: choose (checkout, or directly for a free plan), upgrade or
    downgrade (through the confirmation), or none."""
    name = plan.spec.name
    if current or plan.spec.enterprise or not plan.spec.active:
        return {}
    if paid:
        if plan.spec.price_cents == 0:
            return {}  # leaving a paid plan is a cancellation, in the billing portal
        now_price = frame.plan.spec.price_cents if frame.plan else 0
        verb = "Upgrade to" if plan.spec.price_cents > now_price else "Downgrade to"
        return {"label": f"{verb} {name}", "href": f"/billing/plans/{plan.plan_id}/change"}
    return {"label": f"Choose {name}", "post": f"/billing/plans/{plan.plan_id}/choose"}


async def choose_plan(request: Request, session: BillingSession) -> Response:
    """A plan for a tenant without a paid subscription: checkout for a paid one (the
    subscription appears when the provider confirms the payment), at once for a free one."""
    pages, db, _, adapter = _state(request)
    plan_id = request.path_params["plan_id"]
    now = pages.clock.now()
    base = pages.settings.public_base_url
    try:
        async with db.transaction() as uow:
            plan = await plans.get_plan(uow, plan_id)
            if plan.spec.price_cents == 0 and not plan.spec.enterprise:
                await subscriptions.assign_plan(
                    uow,
                    f"billing:{session.tenant_id}",
                    session.tenant_id,
                    plan_id,
                    now,
                    _grace(pages),
                )
                return _see_other("/billing?notice=assigned")
            link = await payments.start_checkout(
                uow,
                adapter,
                f"billing:{session.tenant_id}",
                session.tenant_id,
                plan_id,
                now,
                success_url=f"{base}/billing/return?session_id={{CHECKOUT_SESSION_ID}}",
                cancel_url=f"{base}/billing/plans?checkout=canceled",
            )
    except Conflict as exc:
        return _see_other(f"/billing/plans?error={_quote(exc.message)}")
    return _see_other(link.url)


async def confirm_change(request: Request, session: BillingSession) -> Response:
    """Before an upgrade or downgrade: what changes, what is due today, the next invoice."""
    pages, db, _, adapter = _state(request)
    frame = await _frame(request, session)
    plan_id = request.path_params["plan_id"]
    error = ""
    try:
        async with db.transaction() as uow:
            change, cost = await payments.preview_plan_change(
                uow, adapter, session.tenant_id, plan_id
            )
    except Conflict as exc:
        return _see_other(f"/billing/plans?error={_quote(exc.message)}")
    if request.method == "POST":
        try:
            async with db.transaction() as uow:
                await payments.change_plan(
                    uow,
                    adapter,
                    f"billing:{session.tenant_id}",
                    session.tenant_id,
                    plan_id,
                    pages.clock.now(),
                    _grace(pages),
                )
            return _see_other("/billing?notice=changed")
        except Conflict as exc:
            error = exc.message
    before = {(q.resource, q.period): q for q in change.current.spec.quotas}
    after = {(q.resource, q.period): q for q in change.target.spec.quotas}
    limits = [
        {
            "what": f"{fmt.resource_name(r).capitalize()} ({p.value})",
            "before": fmt.limit_in_words(before[(r, p)], frame.formats)
            if (r, p) in before
            else "—",
            "after": fmt.limit_in_words(after[(r, p)], frame.formats) if (r, p) in after else "—",
        }
        for r, p in sorted(before.keys() | after.keys(), key=lambda k: (k[0], k[1].value))
    ]
    return pages.render(
        request,
        "billing/change.html",
        402 if error else 200,
        **frame.context(change=change, cost=cost, limits=limits, error=error),
    )


async def open_portal(request: Request, session: BillingSession) -> Response:
    pages, db, _, adapter = _state(request)
    try:
        async with db.transaction() as uow:
            link = await payments.open_portal(
                uow,
                adapter,
                session.tenant_id,
                return_url=f"{pages.settings.public_base_url}/billing?from=portal",
            )
    except Conflict as exc:
        return _see_other(f"/billing/plans?error={_quote(exc.message)}")
    return _see_other(link.url)


# --- checkout return, live status, limits -------------------------------------------------


async def checkout_return(request: Request) -> Response:
    """Back from a paid checkout: 'activating' until the verified webhook has made the plan
    active (the page asks /billing/status; without a session it shows nothing more)."""
    pages: Pages = request.app.state.pages
    session = pages.billing_session(request)
    try:
        frame = await _frame(request, session) if session is not None else None
    except NotFound:
        frame = None
    return pages.render(
        request, "billing/return.html", frame=frame, f=frame.formats if frame else None
    )


async def status(request: Request, session: BillingSession) -> Response:
    frame = await _frame(request, session)
    sub = frame.subscription
    return JSONResponse(
        {
            "status": sub.status,
            "plan_id": sub.plan_id,
            "plan_name": sub.plan_name,
            "headline": frame.headline,
            "active": sub.status in ("active", "trialing")
            and sub.stripe_subscription_id is not None,
        },
        headers={"Cache-Control": "no-store"},
    )


async def limit_page(request: Request, session: BillingSession) -> Response:
    """Where the platform sends its user when the sidecar said no: which limit, when it
    resets, the sidecar's own sentence, and the plan that would allow more."""
    pages, db, engine, _ = _state(request)
    frame = await _frame(request, session)
    resource = request.path_params["resource"]
    try:
        validate_resource(resource)
        amount = max(1, min(int(request.query_params.get("amount", "1")), 10**15))
    except (QuotaError, ValueError):
        return pages.render(request, "billing/not_found.html", 404, **frame.context())
    probe = await engine.consume(
        ConsumeRequest(session.tenant_id, resource, amount, "billing-page-probe", dry_run=True)
    )
    report = await engine.usage(UsageRequest(session.tenant_id, resource))
    upgrade = None
    if not probe.allowed and probe.upgrade_plan_id:
        async with db.transaction() as uow:
            upgrade = await plans.get_plan(uow, probe.upgrade_plan_id)
    paid = frame.subscription.stripe_subscription_id is not None
    return pages.render(
        request,
        "billing/limit.html",
        title=_LIMIT_TITLES.get(probe.reason, "{} limit reached").format(
            fmt.resource_name(resource).capitalize()
        ),
        **frame.context(
            resource=resource,
            name=fmt.resource_name(resource),
            probe=probe,
            meters=_meters(report),
            upgrade=upgrade,
            paid=paid,
            now=pages.clock.now(),
        ),
    )


_LIMIT_TITLES = {
    Reason.ALLOWED: "{}: within your limits",
    Reason.NO_ACTIVE_SUBSCRIPTION: "No active plan",
    Reason.TRIAL_EXPIRED: "Your trial has ended",
    Reason.PAYMENT_PAST_DUE: "Payment overdue",
    Reason.RESOURCE_NOT_IN_PLAN: "{} are not in your plan",
    Reason.INSUFFICIENT_CREDITS: "Not enough credits",
}


def _see_other(url: str) -> Response:
    return Response(status_code=303, headers={"Location": url})


def _quote(text: str) -> str:
    return quote(text[:300], safe="")


async def start_session(request: Request) -> Response:
    """GET /billing/session?token=…: a valid billing link opens a session for its tenant."""
    pages: Pages = request.app.state.pages
    opened = pages.open_billing_session(request, request.query_params.get("token", ""))
    return opened if opened is not None else pages.no_session(request)


def routes() -> list[Route]:
    return [
        Route("/billing/session", start_session),
        Route("/billing", page(overview)),
        Route("/billing/plans", page(plan_picker)),
        Route("/billing/plans/{plan_id}/choose", page(choose_plan), methods=["POST"]),
        Route("/billing/plans/{plan_id}/change", page(confirm_change), methods=["GET", "POST"]),
        Route("/billing/portal", page(open_portal), methods=["POST"]),
        Route("/billing/return", checkout_return),
        Route("/billing/status", page(status)),
        Route("/billing/limits/{resource}", page(limit_page)),
    ]
