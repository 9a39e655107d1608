"""The admin pages: sign in with an admin API key; plans, model prices, tenants, failed
webhook events and the audit log, each change through the same use case as the API, with
its audit entry."""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from dataclasses import fields
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import quote

from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from billing_core.billing import (
    api_keys,
    audit,
    plans,
    prices,
    subscriptions,
    tenants,
    usage,
    wallet,
    webhooks,
)
from billing_core.billing.model import AuditFilter, PlanView, PriceView, quota
from billing_core.db.unit_of_work import Database
from billing_core.errors import InvalidRequest, NotFound, QuotaError
from billing_core.quota.engine import QuotaEngine
from billing_core.quota.requests import UsageRequest
from billing_core.rules.limits import DEFAULT_WARN_AT
from billing_core.rules.resources import BUILTIN_RESOURCES, Period
from control_plane.api.auth import FailedAuthentications, client_address, too_many
from control_plane.ui import forms
from control_plane.ui.formatting import Formats
from control_plane.ui.web import AdminSession, Pages

LOGIN_COOKIE = "bp_admin_login"
Handler = Callable[[Request, AdminSession, "Admin"], Awaitable[Response]]
PERIODS = [p.value for p in Period]
RESOURCES = sorted(BUILTIN_RESOURCES)


class Admin:
    """What an admin page gets besides its request: the signed-in operator's form token,
    the database, the clock, the formats."""

    def __init__(self, request: Request, session: AdminSession) -> None:
        state = request.app.state
        self.pages: Pages = state.pages
        self.db: Database = state.db
        self.engine: QuotaEngine = state.engine
        self.session = session
        self.now = self.pages.clock.now()
        self.form_token = self.pages.form_token(session.session_id)
        self.formats = Formats(self.pages.locale(request), "UTC", self.now)

    def render(self, request: Request, template: str, status: int = 200, **ctx: Any) -> Response:
        return self.pages.render(request, template, status, admin=self, f=self.formats, **ctx)


def admin_page(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        pages: Pages = request.app.state.pages
        session = pages.admin_session(request)
        if session is not None:
            async with request.app.state.db.transaction() as uow:
                if not await api_keys.key_is_live(uow, session.actor):
                    session = None  # the key was revoked: its sessions end with it
        if session is None:
            return _see_other(f"/admin/login?next={quote(request.url.path, safe='/')}")
        if request.method == "POST":
            form = await request.form()
            if not pages.form_token_valid(session.session_id, form.get("csrf")):
                return pages.forbidden(request)
        try:
            return await handler(request, session, Admin(request, session))
        except NotFound as exc:
            return pages.render(request, "admin/not_found.html", 404, message=exc.message)

    return endpoint


def _see_other(url: str) -> Response:
    return Response(status_code=303, headers={"Location": url})


def _next(request: Request, form: FormData | None = None) -> str:
    target = (form.get("next") if form else None) or request.query_params.get("next", "")
    # only a path of these pages: never somewhere else
    if isinstance(target, str) and target.startswith("/admin/") and "//" not in target:
        return target
    return "/admin/plans"


# --- signing in and out ----------------------------------------------------------------------


async def login(request: Request) -> Response:
    pages: Pages = request.app.state.pages
    if pages.signer is None:
        return pages.render(request, "admin/login.html", 503, unavailable=True)
    error = ""
    target = _next(request)
    if request.method == "POST":
        failures: FailedAuthentications = request.app.state.auth_failures
        address = client_address(request.scope)
        wait = failures.retry_after(address)
        if wait:
            return too_many(wait)
        form = await request.form()
        target = _next(request, form)
        login_id = request.cookies.get(LOGIN_COOKIE, "")
        if not pages.form_token_valid(login_id, form.get("csrf")):
            return pages.forbidden(request)
        key = str(form.get("api_key", "")).strip()
        caller = None
        if key and "\x00" not in key:
            async with request.app.state.db.transaction() as uow:
                caller = await api_keys.verify_api_key(uow, key)
        if caller is not None and caller.may_change:
            response = pages.open_admin_session(request, caller.api_key_id, target)
            response.delete_cookie(LOGIN_COOKIE, path="/admin")
            return response
        if caller is None:
            failures.failed(address)
            error = "That key is not a valid admin API key."
        else:
            error = "That key may only read: sign in with an admin key."
    login_id = secrets.token_hex(16)
    response = pages.render(
        request,
        "admin/login.html",
        401 if error else 200,
        error=error,
        form_token=pages.form_token(login_id),
        next=target,
    )
    response.set_cookie(
        LOGIN_COOKIE, login_id, max_age=3600, path="/admin", httponly=True, samesite="lax"
    )
    return response


async def logout(request: Request, session: AdminSession, admin: Admin) -> Response:
    response = _see_other("/admin/login")
    Pages.end_admin_session(response)
    return response


async def home(request: Request, session: AdminSession, admin: Admin) -> Response:
    return _see_other("/admin/plans")


# --- plans ----------------------------------------------------------------------------------


async def plan_list(request: Request, session: AdminSession, admin: Admin) -> Response:
    async with admin.db.transaction() as uow:
        found = await plans.all_plans(uow)
    found.sort(key=lambda p: (not p.spec.active, p.spec.price_cents, p.plan_id))
    return admin.render(
        request, "admin/plans.html", plans=found, notice=request.query_params.get("notice", "")
    )


def _plan_form(
    request: Request,
    admin: Admin,
    values: dict[str, Any],
    errors: forms.FormErrors,
    *,
    plan: PlanView | None = None,
    status: int = 200,
) -> Response:
    return admin.render(
        request,
        "admin/plan_form.html",
        status,
        values=values,
        errors=errors,
        plan_id=plan.plan_id if plan else None,
        plan=plan,
        rows=forms.row_count(values),
        periods=PERIODS,
        resources=RESOURCES,
        default_warn=", ".join(str(t) for t in DEFAULT_WARN_AT),
        notice=request.query_params.get("notice", "") if status == 200 else "",
    )


async def plan_new(request: Request, session: AdminSession, admin: Admin) -> Response:
    if request.method == "GET":
        return _plan_form(request, admin, forms.plan_form_values(None), forms.FormErrors())
    form = await request.form()
    spec, errors = forms.read_plan(form)
    plan_id = str(form.get("plan_id", "")).strip() or None
    if spec is not None:
        try:
            async with admin.db.transaction() as uow:
                view = await plans.create_plan(uow, session.actor, spec, admin.now, plan_id)
            return _see_other(f"/admin/plans/{view.plan_id}?notice=created")
        except QuotaError as exc:
            errors = forms.refusal(errors, exc.message)
    return _plan_form(request, admin, forms.echo(form), errors, status=422)


async def plan_edit(request: Request, session: AdminSession, admin: Admin) -> Response:
    plan_id = request.path_params["plan_id"]
    async with admin.db.transaction() as uow:
        current = await plans.get_plan(uow, plan_id)
    if request.method == "GET":
        values = forms.plan_form_values(current.spec)
        return _plan_form(request, admin, values, forms.FormErrors(), plan=current)
    form = await request.form()
    spec, errors = forms.read_plan(form)
    if spec is not None:
        changes = {
            f.name: getattr(spec, f.name)
            for f in fields(spec)
            if getattr(spec, f.name) != getattr(current.spec, f.name)
        }
        try:
            async with admin.db.transaction() as uow:
                await plans.update_plan(uow, session.actor, plan_id, changes, admin.now)
            return _see_other(f"/admin/plans/{plan_id}?notice=saved")
        except QuotaError as exc:
            errors = forms.refusal(errors, exc.message)
    return _plan_form(request, admin, forms.echo(form), errors, plan=current, status=422)


async def plan_archive(request: Request, session: AdminSession, admin: Admin) -> Response:
    plan_id = request.path_params["plan_id"]
    async with admin.db.transaction() as uow:
        await plans.archive_plan(uow, session.actor, plan_id, admin.now)
    return _see_other(f"/admin/plans/{plan_id}?notice=archived")


# --- prices ---------------------------------------------------------------------------------


async def price_list(request: Request, session: AdminSession, admin: Admin) -> Response:
    errors = forms.FormErrors()
    values: dict[str, Any] = {}
    status = 200
    if request.method == "POST":
        form = await request.form()
        values = forms.echo(form)
        provider, model = values.get("provider", "").strip(), values.get("model", "").strip()
        inp = forms.read_amount(form, "input", errors, 1_000_000)
        out = forms.read_amount(form, "output", errors, 1_000_000)
        when = admin.now
        if values.get("effective_from", "").strip():
            try:
                when = datetime.fromisoformat(values["effective_from"].strip())
                if when.tzinfo is None:
                    errors.add("effective_from", "Give the time zone too, e.g. 2027-01-01T00:00Z.")
            except ValueError:
                errors.add("effective_from", "Enter a date and time like 2027-01-01T00:00Z.")
        for name, given in (("provider", provider), ("model", model)):
            if not given:
                errors.add(name, "Required.")
        if not errors:
            try:
                async with admin.db.transaction() as uow:
                    await prices.set_price(
                        uow,
                        session.actor,
                        PriceView(provider, model, when, inp or 0, out or 0),
                        admin.now,
                    )
                return _see_other("/admin/prices?notice=saved")
            except QuotaError as exc:
                errors = forms.refusal(errors, exc.message)
        status = 422
    async with admin.db.transaction() as uow:
        found = await prices.list_prices(uow, limit=500, cursor=None)
    return admin.render(
        request,
        "admin/prices.html",
        status,
        prices=found.items,
        values=values,
        errors=errors,
        notice=request.query_params.get("notice", ""),
    )


# --- tenants --------------------------------------------------------------------------------


async def tenant_list(request: Request, session: AdminSession, admin: Admin) -> Response:
    text = request.query_params.get("q", "").strip()[:128]
    cursor = request.query_params.get("cursor") or None
    async with admin.db.transaction() as uow:
        found = (
            await tenants.search_tenants(uow, text, limit=50, cursor=cursor)
            if text
            else await tenants.list_tenants(uow, limit=50, cursor=cursor)
        )
    return admin.render(request, "admin/tenants.html", tenants=found, q=text)


async def tenant_page(request: Request, session: AdminSession, admin: Admin) -> Response:
    tenant_id = request.path_params["tenant_id"]
    grace = timedelta(days=admin.pages.settings.past_due_grace_days)
    async with admin.db.transaction() as uow:
        tenant = await tenants.get_tenant(uow, tenant_id)
        sub = await subscriptions.get_subscription(uow, tenant_id, admin.now, grace)
        purse = await wallet.get_wallet(uow, tenant_id, admin.now, limit=10)
        overrides = await tenants.get_overrides(uow, tenant_id)
        notes = await usage.list_notifications(uow, tenant_id, limit=10, cursor=None)
        records = await usage.latest_records(uow, tenant_id, 10)
        trail = await audit.list_entries(
            uow, AuditFilter(entity_type="tenant", entity_id=tenant_id), limit=20, cursor=None
        )
    report = await admin.engine.usage(UsageRequest(tenant_id))
    f = Formats(admin.formats.locale, tenant.timezone, admin.now)
    return admin.render(
        request,
        "admin/tenant.html",
        tenant=tenant,
        sub=sub,
        wallet=purse,
        overrides=overrides,
        notes=notes.items,
        records=records,
        trail=trail.items,
        meters=[(r.resource, w) for r in report.resources for w in r.windows],
        tf=f,
        now=admin.now,
        notice=request.query_params.get("notice", ""),
        error=request.query_params.get("error", "")[:300],
        periods=PERIODS,
        resources=RESOURCES,
    )


async def tenant_grant(request: Request, session: AdminSession, admin: Admin) -> Response:
    tenant_id = request.path_params["tenant_id"]
    form = await request.form()
    errors = forms.FormErrors()
    amount = forms.read_amount(form, "amount", errors, forms.MICROS)
    days = forms.read_int(form, "days", errors)
    reason = str(form.get("reason", "")).strip()
    if errors or not amount:
        return _see_other(
            f"/admin/tenants/{quote(tenant_id)}?error="
            + quote(next(iter(errors.fields.values()), "Enter an amount of credits."))
        )
    try:
        async with admin.db.transaction() as uow:
            await wallet.grant(
                uow,
                session.actor,
                tenant_id,
                amount,
                reason,
                admin.now,
                admin.now + timedelta(days=days) if days > 0 else None,
            )
    except InvalidRequest as exc:
        return _see_other(f"/admin/tenants/{quote(tenant_id)}?error={quote(exc.message)}")
    return _see_other(f"/admin/tenants/{quote(tenant_id)}?notice=granted")


async def tenant_overrides(request: Request, session: AdminSession, admin: Admin) -> Response:
    tenant_id = request.path_params["tenant_id"]
    form = await request.form()
    found = []
    try:
        for i in forms.quota_rows(form):
            resource = str(form.get(f"quota-{i}-resource", "")).strip()
            if resource:
                found.append(
                    quota(
                        resource,
                        str(form.get(f"quota-{i}-period", "")),
                        int(str(form.get(f"quota-{i}-limit", "0")).replace(",", "")),
                        overage=str(form.get(f"quota-{i}-overage") or "block"),
                    )
                )
        async with admin.db.transaction() as uow:
            await tenants.set_overrides(uow, session.actor, tenant_id, found, admin.now)
    except (QuotaError, ValueError) as exc:
        message = exc.message if isinstance(exc, QuotaError) else "Enter whole-number limits."
        return _see_other(f"/admin/tenants/{quote(tenant_id)}?error={quote(message)}")
    return _see_other(f"/admin/tenants/{quote(tenant_id)}?notice=overrides")


async def tenant_billing(request: Request, session: AdminSession, admin: Admin) -> Response:
    """Open the tenant's billing pages as its owner would (a billing link, audited)."""
    tenant_id = request.path_params["tenant_id"]
    expires = admin.now + timedelta(minutes=15)
    async with admin.db.transaction() as uow:
        await tenants.grant_billing_access(uow, session.actor, tenant_id, expires, admin.now)
    return _see_other(admin.pages.billing_link(tenant_id, None, expires))


# --- webhook events and the audit log -----------------------------------------------------------


async def webhook_list(request: Request, session: AdminSession, admin: Admin) -> Response:
    wanted = request.query_params.get("status", "failed")
    status = wanted if wanted in webhooks.STATUSES else None
    async with admin.db.transaction() as uow:
        found = await webhooks.list_events(
            uow, status=status, limit=100, cursor=request.query_params.get("cursor") or None
        )
    return admin.render(
        request,
        "admin/webhooks.html",
        events=found,
        shown=status or "all",
        statuses=webhooks.STATUSES,
    )


async def webhook_page(request: Request, session: AdminSession, admin: Admin) -> Response:
    event_id = request.path_params["event_id"]
    if request.method == "POST":
        stored = await webhooks.reprocess(
            admin.db, request.app.state.billing, session.actor, event_id, admin.now
        )
        if stored.status == "failed":
            request.app.state.webhook_failures.labels(type=stored.type).inc()
        outcome = "failed_again" if stored.status == "failed" else "reprocessed"
        return _see_other(f"/admin/webhooks/{quote(event_id)}?notice={outcome}")
    async with admin.db.transaction() as uow:
        event, payload = await webhooks.get_event(uow, event_id)
    return admin.render(
        request,
        "admin/webhook.html",
        event=event,
        payload=payload,
        notice=request.query_params.get("notice", ""),
    )


async def audit_log(request: Request, session: AdminSession, admin: Admin) -> Response:
    q = request.query_params
    flt = AuditFilter(
        *(
            q.get(k, "").strip()[:128] or None
            for k in ("actor", "action", "entity_type", "entity_id")
        )
    )
    async with admin.db.transaction() as uow:
        found = await audit.list_entries(uow, flt, limit=50, cursor=q.get("cursor") or None)
    return admin.render(request, "admin/audit.html", entries=found, flt=flt)


def routes() -> list[Route]:
    return [
        Route("/admin/login", login, methods=["GET", "POST"]),
        Route("/admin/logout", admin_page(logout), methods=["POST"]),
        Route("/admin", admin_page(home)),
        Route("/admin/plans", admin_page(plan_list)),
        Route("/admin/plans/new", admin_page(plan_new), methods=["GET", "POST"]),
        Route("/admin/plans/{plan_id}", admin_page(plan_edit), methods=["GET", "POST"]),
        Route("/admin/plans/{plan_id}/archive", admin_page(plan_archive), methods=["POST"]),
        Route("/admin/prices", admin_page(price_list), methods=["GET", "POST"]),
        Route("/admin/tenants", admin_page(tenant_list)),
        Route("/admin/tenants/{tenant_id}", admin_page(tenant_page)),
        Route("/admin/tenants/{tenant_id}/grants", admin_page(tenant_grant), methods=["POST"]),
        Route(
            "/admin/tenants/{tenant_id}/overrides", admin_page(tenant_overrides), methods=["POST"]
        ),
        Route("/admin/tenants/{tenant_id}/billing", admin_page(tenant_billing), methods=["POST"]),
        Route("/admin/webhooks", admin_page(webhook_list)),
        Route("/admin/webhooks/{event_id}", admin_page(webhook_page), methods=["GET", "POST"]),
        Route("/admin/audit", admin_page(audit_log)),
    ]
