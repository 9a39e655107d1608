"""Bearer API keys for everything under /v1/: missing or wrong key → 401, nothing else said."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from billing_core.billing.api_keys import verify_api_key
from billing_core.db.unit_of_work import Database
from billing_core.errors import Unavailable
from control_plane.api.problems import problem

PROTECTED_PREFIX = "/v1/"


class ApiKeyAuth:
    """Pure ASGI middleware, so it also covers routes added later by other modules."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PROTECTED_PREFIX):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        scheme, _, key = headers.get("authorization", "").partition(" ")
        actor = None
        if scheme.lower() == "bearer" and key.strip() and "\x00" not in key:
            db: Database = scope["app"].state.db
            try:
                async with db.transaction() as uow:
                    actor = await verify_api_key(uow, key.strip())
            except Unavailable:
                response = problem(503, "the database is unavailable; retry later")
                await response(scope, receive, send)
                return
        if actor is None:
            response = problem(
                401,
                "a valid API key is required: Authorization: Bearer <key>",
                headers={"WWW-Authenticate": "Bearer"},
            )
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["actor"] = actor
        await self.app(scope, receive, send)
