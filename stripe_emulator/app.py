"""create_app(settings): the emulator's API (as the stripe SDK calls it), its hosted checkout,
portal and invoice pages, and webhook delivery."""

from __future__ import annotations

import contextlib
import hashlib
import html
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from billing_core.settings import Settings
from stripe_emulator.forms import decode
from stripe_emulator.state import Emulator, Obj, StripeError, public
from stripe_emulator.webhooks import WebhookConfig, WebhookSender

Api = Callable[[Request, Obj], Obj]


def _e(value: object) -> str:
    """Escaped for HTML text and quoted attributes."""
    return html.escape(str(value), quote=True)


def _error(exc: StripeError) -> JSONResponse:
    return JSONResponse(exc.body, status_code=exc.status)


def create_app(settings: Settings, *, base_url: str | None = None) -> Starlette:
    base = base_url or f"http://{settings.stripe_emulator_host}:{settings.stripe_emulator_port}"
    emulator = Emulator(secret_key=settings.stripe_emulator_key, base_url=base)
    sender = WebhookSender(
        WebhookConfig(url=settings.stripe_webhook_url, secret=settings.stripe_webhook_secret)
    )
    emulator.on_event = sender.enqueue
    portal_sessions: dict[str, Obj] = {}

    def api(handler: Api) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            scheme, _, key = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or key != emulator.secret_key:
                return _error(StripeError(401, f"Invalid API Key provided: {key[:8]}***"))
            raw = (await request.body()).decode()
            params = decode(raw if request.method == "POST" else request.url.query)
            idem = request.headers.get("idempotency-key") if request.method == "POST" else None
            digest = hashlib.sha256(f"{request.url.path}?{raw}".encode()).hexdigest()
            if idem and idem in emulator.idempotency:
                seen_digest, status, body = emulator.idempotency[idem]
                if seen_digest != digest:
                    return _error(
                        StripeError(
                            400,
                            "Keys for idempotent requests can only be used with the same "
                            "parameters they were first used with.",
                            type_="idempotency_error",
                        )
                    )
                return JSONResponse(body, status, headers={"Idempotent-Replayed": "true"})
            try:
                status, body = 200, public(handler(request, params))
            except StripeError as exc:
                status, body = exc.status, exc.body
            if idem:
                emulator.idempotency[idem] = (digest, status, body)
            return JSONResponse(body, status, headers={"Request-Id": f"req_{digest[:14]}"})

        return endpoint

    def path(request: Request, name: str = "id") -> str:
        return str(request.path_params[name])

    def listing(kind: str, url: str, **filters: Any) -> Obj:
        items = [
            public(o)
            for o in emulator.objects.values()
            if o["object"] == kind and all(v is None or o.get(k) == v for k, v in filters.items())
        ]
        items.sort(key=lambda o: o.get("created") or 0, reverse=True)
        return emulator.listing(items, url)

    def list_subscriptions(request: Request, p: Obj) -> Obj:
        found = listing("subscription", "/v1/subscriptions", customer=p.get("customer"))
        status = p.get("status")
        if status and status != "all":
            found["data"] = [s for s in found["data"] if s["status"] == status]
        elif not status:
            found["data"] = [s for s in found["data"] if s["status"] != "canceled"]
        return found

    def list_invoices(request: Request, p: Obj) -> Obj:
        found = listing("invoice", "/v1/invoices", customer=p.get("customer"))
        sub = p.get("subscription")
        if sub:
            found["data"] = [
                i
                for i in found["data"]
                if i["parent"]["subscription_details"]["subscription"] == sub
            ]
        return found

    def list_events(request: Request, p: Obj) -> Obj:
        events = [public(e) for e in emulator.events]
        if p.get("type"):
            events = [e for e in events if e["type"] == p["type"]]
        return emulator.listing(events, "/v1/events")

    def create_portal(request: Request, p: Obj) -> Obj:
        customer = emulator.get("customer", p.get("customer", ""), "customer")
        session = {
            "id": f"bps_{hashlib.sha256(json.dumps(p).encode()).hexdigest()[:8]}"
            f"{len(portal_sessions)}",
            "object": "billing_portal.session",
            "customer": customer["id"],
            "return_url": p.get("return_url"),
            "created": emulator.now_for(customer["id"]),
            "livemode": False,
            "configuration": "bpc_emulator",
            "customer_account": None,
            "flow": None,
            "locale": None,
            "on_behalf_of": None,
        }
        session["url"] = f"{base}/portal/{session['id']}"
        portal_sessions[session["id"]] = session
        return session

    # --- emulator controls (not part of Stripe's API) --------------------------------------

    async def webhook_control(request: Request) -> Response:
        key = request.headers.get("authorization", "").partition(" ")[2]
        if key != emulator.secret_key:
            return _error(StripeError(401, "Invalid API Key provided"))
        if request.method == "POST":
            changes = await request.json()
            for name in ("url", "secret", "copies", "shuffle", "paused"):
                if name in changes:
                    setattr(sender.config, name, changes[name])
            if changes.get("discard"):  # drop what is queued (events nobody should get)
                while not sender.queue.empty():
                    sender.queue.get_nowait()
            if changes.get("wait"):
                await sender.idle()
        return JSONResponse(
            {
                "url": sender.config.url,
                "copies": sender.config.copies,
                "shuffle": sender.config.shuffle,
                "paused": sender.config.paused,
                "pending": sender.queue.qsize() + sender.in_flight,
                "delivered": sender.delivered,
                "failed_attempts": sender.failed_attempts,
            }
        )

    # --- hosted pages ------------------------------------------------------------------------

    def page(title: str, body: str) -> HTMLResponse:
        return HTMLResponse(
            "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>body{{font:16px system-ui;max-width:"
            "36rem;margin:3rem auto;padding:0 1rem}input,button{font:inherit;padding:.4rem}"
            ".error{color:#b00}</style></head><body>"
            f"<p><small>Local Stripe emulator · test mode</small></p><h1>{html.escape(title)}</h1>"
            f"{body}</body></html>"
        )

    def checkout_form(session: Obj, error: str = "") -> HTMLResponse:
        price = emulator.get("price", session["_line_price"])
        product = emulator.get("product", price["product"])
        amount = f"{price['unit_amount'] / 100:.2f} {price['currency'].upper()}"
        trial = session["_trial_days"]
        due = f"{trial}-day free trial, then {amount}" if trial else f"{amount} due today"
        err = f"<p class='error' role='alert'>{html.escape(error)}</p>" if error else ""
        cancel = session.get("cancel_url")
        cancel_link = f"<p><a href='{html.escape(cancel)}'>Cancel</a></p>" if cancel else ""
        return page(
            f"Subscribe to {product['name']}",
            f"<p>{_e(due)} per {_e(price['recurring']['interval'])}.</p>{err}"
            f"<form method='post'><label>Card number <input name='card' id='card' "
            f"autocomplete='off' placeholder='4242 4242 4242 4242'></label> "
            f"<button type='submit' id='pay'>Pay</button></form>{cancel_link}",
        )

    async def checkout_page(request: Request) -> Response:
        try:
            session = emulator.get("checkout.session", path(request))
        except StripeError as exc:
            return page("Not found", html.escape(str(exc)))
        if session["status"] != "open":
            return page("Already paid", "<p>This checkout session is complete.</p>")
        if request.method == "GET":
            return checkout_form(session)
        form = decode((await request.body()).decode())
        try:
            target = emulator.pay_checkout(session["id"], str(form.get("card", "")))
        except StripeError as exc:
            return checkout_form(session, str(exc))
        return RedirectResponse(target, status_code=303)

    def portal_html(session: Obj, note: str = "") -> HTMLResponse:
        customer = session["customer"]
        subs = [
            o
            for o in emulator.objects.values()
            if o["object"] == "subscription" and o["customer"] == customer
        ]
        invoices = [
            o
            for o in emulator.objects.values()
            if o["object"] == "invoice" and o["customer"] == customer
        ]
        prices = [o for o in emulator.objects.values() if o["object"] == "price" and o["active"]]
        parts = [f"<p class='note' role='status'>{html.escape(note)}</p>" if note else ""]
        for sub in subs:
            price = sub["items"]["data"][0]["price"]
            product = emulator.objects.get(price["product"], {"name": price["product"]})
            ending = " (cancels at period end)" if sub["cancel_at_period_end"] else ""
            parts.append(
                f"<h2>{html.escape(product['name'])}: <span class='status'>{_e(sub['status'])}"
                f"</span>{ending}</h2>"
            )
            if sub["status"] == "canceled":
                continue
            action = "resume" if sub["cancel_at_period_end"] else "cancel"
            parts.append(
                f"<form method='post' action='/portal/{_e(session['id'])}/{action}'>"
                f"<input type='hidden' name='sub' value='{_e(sub['id'])}'>"
                f"<button id='{action}'>{action.title()} subscription</button></form>"
            )
            options = "".join(
                f"<option value='{_e(p['id'])}'>{_e(emulator.objects[p['product']]['name'])}"
                f" {p['unit_amount'] / 100:.2f}</option>"
                for p in prices
                if p["id"] != price["id"]
                and p["recurring"]["interval"] == price["recurring"]["interval"]
            )
            if options:
                parts.append(
                    f"<form method='post' action='/portal/{_e(session['id'])}/change'>"
                    f"<input type='hidden' name='sub' value='{_e(sub['id'])}'>"
                    f"<select name='price' id='price'>{options}</select> "
                    "<button id='change'>Change plan</button></form>"
                )
        parts.append(
            f"<form method='post' action='/portal/{_e(session['id'])}/card'><label>New card "
            "<input name='card' id='card'></label> <button id='update-card'>Update card"
            "</button></form><h2>Invoices</h2><ul>"
        )
        for inv in sorted(invoices, key=lambda i: i["created"]):
            parts.append(
                f"<li>{_e(inv['number'])}: {inv['total'] / 100:.2f} {_e(inv['currency'].upper())} "
                f"— {_e(inv['status'])}</li>"
            )
        parts.append("</ul>")
        if session.get("return_url"):
            parts.append(
                f"<p><a id='return' href='{html.escape(session['return_url'])}'>Return</a></p>"
            )
        return page("Billing portal", "".join(parts))

    async def portal_page(request: Request) -> Response:
        session = portal_sessions.get(path(request))
        if session is None:
            return page("Not found", "<p>This portal session does not exist.</p>")
        return portal_html(session)

    async def portal_action(request: Request) -> Response:
        session = portal_sessions.get(path(request))
        if session is None:
            return page("Not found", "<p>This portal session does not exist.</p>")
        form = decode((await request.body()).decode())
        action = path(request, "action")
        sub_id = str(form.get("sub", ""))
        try:
            if sub_id:
                sub = emulator.get("subscription", sub_id)
                if sub["customer"] != session["customer"]:
                    raise StripeError(404, "No such subscription")
            if action == "cancel":
                emulator.update_subscription(sub_id, {"cancel_at_period_end": "true"})
                note = "Your subscription will end at the end of the period."
            elif action == "resume":
                emulator.update_subscription(sub_id, {"cancel_at_period_end": "false"})
                note = "Your subscription continues."
            elif action == "change":
                item = emulator.get("subscription", sub_id)["items"]["data"][0]
                emulator.update_subscription(
                    sub_id,
                    {
                        "items": [{"id": item["id"], "price": str(form.get("price", ""))}],
                        "proration_behavior": "always_invoice",
                    },
                )
                note = "Your plan was changed."
            elif action == "card":
                emulator.pay_open_invoices(session["customer"], str(form.get("card", "")))
                note = "Your card was updated."
            else:
                raise StripeError(404, "Unknown action")
        except StripeError as exc:
            note = str(exc)
        return portal_html(session, note)

    async def invoice_page(request: Request) -> Response:
        try:
            inv = emulator.get("invoice", path(request))
        except StripeError as exc:
            return page("Not found", html.escape(str(exc)))
        return page(
            f"Invoice {inv['number']}",
            f"<p>{inv['total'] / 100:.2f} {_e(inv['currency'].upper())} — {_e(inv['status'])}</p>",
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if settings.stripe_emulator_state:
            emulator.load(settings.stripe_emulator_state)
        await sender.start()
        try:
            yield
        finally:
            await sender.stop()
            if settings.stripe_emulator_state:
                emulator.dump(settings.stripe_emulator_state)

    def r(path_: str, handler: Api, method: str) -> Route:
        return Route(path_, api(handler), methods=[method])

    e = emulator
    routes = [
        r("/v1/customers", lambda q, p: e.create_customer(p), "POST"),
        r("/v1/customers/{id}", lambda q, p: e.get("customer", path(q)), "GET"),
        r("/v1/customers/{id}", lambda q, p: e.update_customer(path(q), p), "POST"),
        r("/v1/products", lambda q, p: e.create_product(p), "POST"),
        r("/v1/products/{id}", lambda q, p: e.get("product", path(q)), "GET"),
        r("/v1/prices", lambda q, p: e.create_price(p), "POST"),
        r("/v1/prices", lambda q, p: listing("price", "/v1/prices",
                                             product=p.get("product")), "GET"),
        r("/v1/prices/{id}", lambda q, p: e.get("price", path(q)), "GET"),
        r("/v1/checkout/sessions", lambda q, p: e.create_checkout_session(p), "POST"),
        r("/v1/checkout/sessions/{id}", lambda q, p: e.get("checkout.session", path(q)), "GET"),
        r("/v1/billing_portal/sessions", create_portal, "POST"),
        r("/v1/subscriptions", list_subscriptions, "GET"),
        r("/v1/subscriptions/{id}", lambda q, p: e.get("subscription", path(q)), "GET"),
        r("/v1/subscriptions/{id}", lambda q, p: e.update_subscription(path(q), p), "POST"),
        r("/v1/subscriptions/{id}", lambda q, p: e.cancel_subscription(path(q)), "DELETE"),
        r("/v1/invoices", list_invoices, "GET"),
        r("/v1/invoices/create_preview", lambda q, p: e.preview_invoice(p), "POST"),
        r("/v1/invoices/{id}", lambda q, p: e.get("invoice", path(q)), "GET"),
        r("/v1/events", list_events, "GET"),
        r("/v1/events/{id}", lambda q, p: e.get("event", path(q)), "GET"),
        r("/v1/test_helpers/test_clocks", lambda q, p: e.create_test_clock(p), "POST"),
        r("/v1/test_helpers/test_clocks/{id}",
          lambda q, p: e.get("test_helpers.test_clock", path(q)), "GET"),
        r("/v1/test_helpers/test_clocks/{id}/advance",
          lambda q, p: e.advance_test_clock(path(q), p), "POST"),
        Route("/_emulator/webhooks", webhook_control, methods=["GET", "POST"]),
        Route("/checkout/pay/{id}", checkout_page, methods=["GET", "POST"]),
        Route("/portal/{id}", portal_page, methods=["GET"]),
        Route("/portal/{id}/{action}", portal_action, methods=["POST"]),
        Route("/invoices/{id}", invoice_page, methods=["GET"]),
        Route("/healthz", lambda request: JSONResponse({"status": "ok"})),
    ]  # fmt: skip
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.emulator = emulator
    app.state.webhooks = sender
    return app
