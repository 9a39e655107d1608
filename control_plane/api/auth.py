"""Bearer API keys for everything under /v1/: missing or wrong key → 401, nothing else
said; an address that keeps failing is answered 429 for a while (keys cannot be guessed
at speed). What a valid key may do is checked per endpoint (routing)."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from billing_core.billing.api_keys import verify_api_key
from billing_core.db.unit_of_work import Database
from billing_core.errors import Unavailable
from control_plane.api.problems import problem

PROTECTED_PREFIX = "/v1/"


class FailedAuthentications:
    """Failed authentications per client address over a sliding minute. An address with
    `limit` of them is refused until the oldest is a minute old — every request, a right
    key too, so that an answer never tells a guess apart. `limit` 0 turns this off."""

    def __init__(
        self,
        limit: int,
        *,
        window_s: float = 60.0,
        max_addresses: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.window_s = window_s
        self.max_addresses = max_addresses
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, address: str) -> deque[float]:
        found = self._failures.get(address)
        if found is None:
            return deque()
        horizon = self._clock() - self.window_s
        while found and found[0] <= horizon:
            found.popleft()
        if not found:
            del self._failures[address]
        return found

    def retry_after(self, address: str) -> int:
        """Seconds until the address may try again (0: it may now)."""
        if self.limit <= 0:
            return 0
        recent = self._recent(address)
        if len(recent) < self.limit:
            return 0
        return max(1, math.ceil(recent[-self.limit] + self.window_s - self._clock()))

    def failed(self, address: str) -> None:
        if self.limit <= 0:
            return
        recent = self._recent(address)
        if address not in self._failures:
            if len(self._failures) >= self.max_addresses:
                del self._failures[next(iter(self._failures))]  # the longest known
            self._failures[address] = recent
        recent.append(self._clock())
        while len(recent) > self.limit:
            recent.popleft()


def client_address(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def too_many(retry_after: int) -> JSONResponse:
    return problem(
        429,
        "too many failed authentications from this address: try again later",
        headers={"Retry-After": str(retry_after)},
    )


class ApiKeyAuth:
    """Pure ASGI middleware, so it also covers routes added later by other modules."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PROTECTED_PREFIX):
            await self.app(scope, receive, send)
            return
        failures: FailedAuthentications = scope["app"].state.auth_failures
        address = client_address(scope)
        wait = failures.retry_after(address)
        if wait:
            await too_many(wait)(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        scheme, _, key = headers.get("authorization", "").partition(" ")
        caller = None
        if scheme.lower() == "bearer" and key.strip() and "\x00" not in key:
            db: Database = scope["app"].state.db
            try:
                async with db.transaction() as uow:
                    caller = await verify_api_key(uow, key.strip())
            except Unavailable:
                response = problem(503, "the database is unavailable; retry later")
                await response(scope, receive, send)
                return
        if caller is None:
            failures.failed(address)
            response = problem(
                401,
                "a valid API key is required: Authorization: Bearer <key>",
                headers={"WWW-Authenticate": "Bearer"},
            )
            await response(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        state["actor"], state["scope"] = caller.api_key_id, caller.scope
        await self.app(scope, receive, send)
