"""create_app(settings): routes, middleware and lifespan wired explicitly."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import timedelta

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Match, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from billing_core.billing import subscriptions, webhooks
from billing_core.billing.provider import BillingAdapter
from billing_core.clock import Clock, SystemClock
from billing_core.db.migrate import head_revision
from billing_core.db.unit_of_work import Database
from billing_core.quota.engine import QuotaEngine, QuotaRules
from billing_core.settings import Settings
from control_plane.api import payments, v1
from control_plane.api.auth import ApiKeyAuth, FailedAuthentications
from control_plane.api.docs import render_docs
from control_plane.api.problems import problem
from control_plane.api.routing import openapi_document, route
from control_plane.stripe_adapter import StripeBillingAdapter
from control_plane.ui import admin as admin_pages
from control_plane.ui import billing as billing_pages
from control_plane.ui.web import PageHeaders, Pages
from control_plane.webhooks import stripe_webhook

log = structlog.get_logger()
API_VERSION = "1.0.0"


ENDPOINTS = [*v1.ENDPOINTS, *payments.ENDPOINTS]


def create_app(
    settings: Settings, clock: Clock | None = None, billing: BillingAdapter | None = None
) -> Starlette:
    clock = clock or SystemClock()
    registry = CollectorRegistry()
    requests_total = Counter(
        "control_plane_requests",
        "HTTP requests by route and status",
        ["route", "status"],
        registry=registry,
    )
    webhook_failures = Counter(
        "billing_webhook_events_failed",
        "Provider webhook events that could not be applied (delivered or re-processed)",
        ["type"],
        registry=registry,
    )
    webhook_reclaimed = Counter(
        "billing_webhook_events_reclaimed",
        "Webhook events stored but never applied (their process died), applied by housekeeping",
        registry=registry,
    )
    openapi = openapi_document(ENDPOINTS, "Billing control plane", API_VERSION)
    docs_html = render_docs(openapi)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        db = await Database.open(
            settings.require_database(), 8, prepared=settings.db_prepared_statements
        )
        app.state.db = db
        grace = timedelta(days=settings.past_due_grace_days)
        app.state.engine = QuotaEngine(db.quota_store, clock, QuotaRules(past_due_grace=grace))
        expiry = asyncio.create_task(
            _housekeeping_forever(db, app.state.billing, clock, settings, webhook_reclaimed)
        )
        try:
            yield
        finally:
            expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await expiry
            await app.state.billing.aclose()
            await db.close()

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        db: Database = request.app.state.db
        database = await db.ping()
        migrations = database and await db.schema_revision() == head_revision()
        ready = database and migrations
        body = {
            "status": "ready" if ready else "not ready",
            "database": database,
            "migrations_current": migrations,
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    async def openapi_json(request: Request) -> Response:
        return JSONResponse(openapi)

    async def docs(request: Request) -> Response:
        return HTMLResponse(docs_html)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        detail = {404: "no such resource", 405: "method not allowed on this resource"}
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # every method of the path, not only one route's
            headers["Allow"] = ", ".join(_allowed_methods(request.app, request.url.path))
        return problem(
            exc.status_code, detail.get(exc.status_code, str(exc.detail)), headers=headers
        )

    async def internal_error(request: Request, exc: Exception) -> Response:
        log.exception("unhandled_error", path=request.url.path)
        return problem(500, "an internal error happened; it has been logged")

    app = Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics),
            Route("/openapi.json", openapi_json),
            Route("/docs", docs),
            *billing_pages.routes(),
            *admin_pages.routes(),
            Mount("/static", StaticFiles(packages=[("control_plane.ui", "static")]), name="static"),
            Route("/webhooks/stripe", stripe_webhook(clock, webhook_failures), methods=["POST"]),
            *(route(ep, clock) for ep in ENDPOINTS),
        ],
        middleware=[
            Middleware(CountRequests, counter=requests_total),
            Middleware(PageHeaders, frame_ancestors=settings.billing_frame_ancestors),
            Middleware(ApiKeyAuth),
        ],
        exception_handlers={HTTPException: http_error, Exception: internal_error},
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.pages = Pages(settings, clock)
    app.state.auth_failures = FailedAuthentications(settings.auth_failures_per_minute)
    app.state.webhook_failures = webhook_failures
    app.state.requests_total = requests_total
    app.state.billing = billing or StripeBillingAdapter(settings)
    return app


async def _housekeeping_forever(
    db: Database,
    billing: BillingAdapter,
    clock: Clock,
    settings: Settings,
    reclaimed: Counter,
) -> None:
    """Every TRIAL_EXPIRY_SECONDS: expire trials past their end (the CLI's expire-trials
    does it on demand) and apply webhook events stored but never applied."""
    reclaim_after = timedelta(seconds=settings.webhook_reclaim_seconds)
    while True:
        try:
            async with db.transaction() as uow:
                expired = await subscriptions.expire_trials(uow, "trial-expiry", clock.now())
            if expired:
                log.info("trials_expired", count=expired)
            taken = await webhooks.reclaim_stale(db, billing, clock.now(), reclaim_after)
            if taken:
                reclaimed.inc(taken)
        except Exception as exc:
            log.warning("housekeeping_skipped", error=type(exc).__name__)
        await asyncio.sleep(max(1, settings.trial_expiry_seconds))


def _allowed_methods(app: Starlette, path: str) -> list[str]:
    methods: set[str] = set()
    for r in app.routes:
        if isinstance(r, Route) and r.methods and r.path_regex.match(path):
            methods |= r.methods
    return sorted(methods)


class CountRequests:
    """Pure ASGI: counts responses by route template and status (streaming untouched)."""

    def __init__(self, app: ASGIApp, counter: Counter) -> None:
        self.app, self.counter = app, counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.counter.labels(_route_of(scope), str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, sending)


def _route_of(scope: Scope) -> str:
    """The route template that served the request; for one answered before routing (a 401
    of the API key check), the template it was meant for."""
    matched = scope.get("route")
    if matched is not None:
        return str(getattr(matched, "path", "unmatched"))
    for candidate in scope["app"].router.routes:
        if candidate.matches(scope)[0] is not Match.NONE:
            return str(getattr(candidate, "path", "unmatched"))
    return "unmatched"
