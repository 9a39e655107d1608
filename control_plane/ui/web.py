"""What every page shares: templates, security headers, the billing and admin sessions
(signed cookies), form tokens against cross-site requests, and the page for no session."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import quote, urlsplit

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from billing_core.clock import Clock
from billing_core.settings import Settings
from control_plane.ui.formatting import negotiate_locale
from control_plane.ui.signing import Signer

BILLING_COOKIE = "bp_billing"
ADMIN_COOKIE = "bp_admin"
PAGE_PREFIXES = ("/billing", "/admin")


@dataclass(frozen=True, slots=True)
class BillingSession:
    tenant_id: str
    session_id: str
    return_url: str | None


@dataclass(frozen=True, slots=True)
class AdminSession:
    actor: str
    session_id: str


class Pages:
    """Templates and sessions of the pages, built once by create_app."""

    def __init__(self, settings: Settings, clock: Clock) -> None:
        self.settings = settings
        self.clock = clock
        secret = settings.billing_link_secret
        # without a secret there are no links and no sessions: every page says so
        self.signer = Signer(secret) if secret else None
        self.env = Environment(
            loader=PackageLoader("control_plane.ui", "templates"),
            autoescape=select_autoescape(default=True),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        # Jinja's own `capitalize` lowercases the rest ("europe/berlin"): this one does not
        self.env.filters["sentence"] = lambda text: str(text)[:1].upper() + str(text)[1:]

    # --- rendering -------------------------------------------------------------------

    def render(
        self, request: Request, template: str, status: int = 200, **context: Any
    ) -> HTMLResponse:
        html = self.env.get_template(template).render(request=request, **context)
        return HTMLResponse(html, status_code=status)

    def locale(self, request: Request) -> str:
        return negotiate_locale(request.headers.get("accept-language", ""))

    def no_session(self, request: Request, notice: str = "") -> HTMLResponse:
        """The page for a billing page without a valid session: nothing of any tenant."""
        return self.render(request, "billing/expired.html", 401, notice=notice)

    # --- billing links and sessions --------------------------------------------------

    def billing_link(
        self,
        tenant_id: str,
        return_url: str | None,
        expires_at: datetime,
        *,
        opens: str = "overview",
    ) -> str:
        """`opens`: the page the link lands on (overview, plans, limits/<resource>)."""
        assert self.signer is not None
        token = self.signer.sign(
            "billing-link",
            {"t": tenant_id, "r": return_url, "n": secrets.token_hex(8), "p": opens},
            expires_at,
        )
        return f"{self.settings.public_base_url}/billing/session?token={token}"

    def open_billing_session(self, request: Request, token: str) -> Response | None:
        """A redirect to the overview with the session cookie set, for a valid link."""
        if self.signer is None:
            return None
        link = self.signer.verify("billing-link", token, self.clock.now())
        if link is None or not isinstance(link.get("t"), str):
            return None
        session = {"t": link["t"], "r": link.get("r"), "s": secrets.token_hex(16)}
        hours = self.settings.billing_session_hours
        value = self.signer.sign("billing-session", session, self._until(hours))
        opens = link.get("p")
        landing = "/billing" if opens in (None, "overview") else f"/billing/{quote(str(opens))}"
        response = Response(status_code=303, headers={"Location": landing})
        self._set_cookie(request, response, BILLING_COOKIE, value, "/billing", hours)
        return response

    def billing_session(self, request: Request) -> BillingSession | None:
        if self.signer is None:
            return None
        found = self.signer.verify(
            "billing-session", request.cookies.get(BILLING_COOKIE), self.clock.now()
        )
        if found is None or not isinstance(found.get("t"), str):
            return None
        return BillingSession(found["t"], str(found.get("s", "")), found.get("r"))

    # --- admin sessions ----------------------------------------------------------------

    def open_admin_session(self, request: Request, actor: str, to: str) -> Response:
        assert self.signer is not None
        hours = self.settings.admin_session_hours
        value = self.signer.sign(
            "admin-session", {"a": actor, "s": secrets.token_hex(16)}, self._until(hours)
        )
        response = Response(status_code=303, headers={"Location": to})
        self._set_cookie(request, response, ADMIN_COOKIE, value, "/admin", hours)
        return response

    def admin_session(self, request: Request) -> AdminSession | None:
        if self.signer is None:
            return None
        found = self.signer.verify(
            "admin-session", request.cookies.get(ADMIN_COOKIE), self.clock.now()
        )
        if found is None or not isinstance(found.get("a"), str):
            return None
        return AdminSession(found["a"], str(found.get("s", "")))

    @staticmethod
    def end_admin_session(response: Response) -> None:
        response.delete_cookie(ADMIN_COOKIE, path="/admin")

    # --- forms ----------------------------------------------------------------------

    def form_token(self, session_id: str) -> str:
        """The token every form of a session carries (a cross-site page cannot know it)."""
        assert self.signer is not None
        return self.signer.sign("form", {"s": session_id}, self._until(24))

    def form_token_valid(self, session_id: str, token: object) -> bool:
        if self.signer is None or not isinstance(token, str) or not session_id:
            return False
        found = self.signer.verify("form", token, self.clock.now())
        return found is not None and found.get("s") == session_id

    def forbidden(self, request: Request) -> HTMLResponse:
        return self.render(request, "form_expired.html", 403)

    # --- plumbing --------------------------------------------------------------------

    def _until(self, hours: int) -> datetime:
        return self.clock.now() + timedelta(hours=hours)

    def _set_cookie(
        self, request: Request, response: Response, name: str, value: str, path: str, hours: int
    ) -> None:
        secure = (
            request.url.scheme == "https"
            or urlsplit(self.settings.public_base_url).scheme == "https"
        )
        response.set_cookie(
            name,
            value,
            max_age=hours * 3600,
            path=path,
            httponly=True,
            secure=secure,
            samesite="lax",
        )


class PageHeaders:
    """Pure ASGI: the pages' security headers (a CSP without inline script, who may embed
    the billing pages, no sniffing, no referrer beyond this site, nothing cached) and a
    Server-Timing header with the time the page took to its first byte."""

    def __init__(self, app: ASGIApp, frame_ancestors: str) -> None:
        self.app = app
        self.csp = (
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            f"connect-src 'self'; base-uri 'none'; frame-ancestors {frame_ancestors}"
        ).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PAGE_PREFIXES):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (k, v)
                    for k, v in message.get("headers", [])
                    if k.lower() not in (b"cache-control", b"x-content-type-options")
                ]
                headers += [
                    (b"content-security-policy", self.csp),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"same-origin"),
                    (b"cache-control", b"no-store"),
                    (b"server-timing", f"app;dur={took_ms():.2f}".encode()),
                ]
                message = {**message, "headers": headers}
            await send(message)

        def took_ms() -> float:
            return (time.perf_counter() - started) * 1000

        await self.app(scope, receive, sending)
