"""A billing stack on free ports: the local Stripe and a control plane wired to it (signed
webhooks both ways), each stack on a database of its own."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import stripe
import uvicorn
from psycopg_pool import AsyncConnectionPool
from starlette.applications import Starlette

from billing_core.billing.api_keys import create_api_key
from billing_core.clock import Clock
from billing_core.db.pool import open_pool
from billing_core.db.unit_of_work import Database
from billing_core.settings import Settings
from control_plane.app import create_app as create_control_plane
from stripe_emulator.app import create_app as create_emulator
from tests.conftest import LINK_SECRET, fresh_database

EMULATOR_KEY = "sk_test_emulator_tests"


def _socket() -> tuple[socket.socket, int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    return sock, port


@contextlib.asynccontextmanager
async def serve(app: Starlette, sock: socket.socket) -> AsyncIterator[None]:
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    try:
        yield
    finally:
        server.should_exit = True
        await task
        sock.close()


@dataclass
class Stack:
    url: str  # control plane
    key: str  # admin key
    emulator_url: str
    settings: Settings
    pool: AsyncConnectionPool[Any]
    emulator_app: Starlette

    def api(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=20
        )

    async def webhooks(self, **changes: Any) -> dict[str, Any]:
        """Switch the emulator's delivery (url, copies, shuffle, paused, wait)."""
        async with httpx.AsyncClient(timeout=60) as http:
            r = await http.post(
                f"{self.emulator_url}/_emulator/webhooks",
                json=changes,
                headers={"Authorization": f"Bearer {EMULATOR_KEY}"},
            )
            r.raise_for_status()
            result: dict[str, Any] = r.json()
            return result

    async def settle(self) -> None:
        """Wait until every webhook the emulator queued was delivered."""
        state = await self.webhooks(wait=True)
        assert state["pending"] == 0, state

    async def fetch(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        async with self.pool.connection() as conn:
            cur = await conn.execute(sql, args)
            return list(await cur.fetchall())


@contextlib.asynccontextmanager
async def billing_stack(
    database_url: str,
    *,
    emulator: Starlette | None = None,
    emulator_url: str = "",
    clock: Clock | None = None,
    **changes: Any,
) -> AsyncIterator[Stack]:
    """A control plane on `database_url` (on `clock`, the system's unless given); a new
    emulator unless one is given (two control planes can share one emulator, as two
    deployments share one Stripe account)."""
    cp_sock, cp_port = _socket()
    settings = Settings(
        database_url=database_url,
        public_base_url=f"http://127.0.0.1:{cp_port}",
        stripe_webhook_secret="whsec_" + secrets.token_hex(16),
        stripe_emulator_key=EMULATOR_KEY,
        stripe_webhook_url=f"http://127.0.0.1:{cp_port}/webhooks/stripe",
        billing_link_secret=LINK_SECRET,
    ).with_changes(**changes)
    async with contextlib.AsyncExitStack() as stack:
        if emulator is None:
            em_sock, em_port = _socket()
            emulator_url = f"http://127.0.0.1:{em_port}"
            emulator = create_emulator(
                settings.with_changes(stripe_emulator_port=em_port), base_url=emulator_url
            )
            await stack.enter_async_context(serve(emulator, em_sock))
        em_port = int(emulator_url.rsplit(":", 1)[1])
        settings = settings.with_changes(stripe_emulator_port=em_port)
        app = create_control_plane(settings, clock)
        await stack.enter_async_context(serve(app, cp_sock))
        pool = await open_pool(database_url, 4)
        stack.push_async_callback(pool.close)
        async with Database(pool).transaction() as uow:
            key = (await create_api_key(uow, "tests", "billing-tests", datetime.now(UTC))).key
        yield Stack(f"http://127.0.0.1:{cp_port}", key, emulator_url, settings, pool, emulator)


@pytest.fixture(scope="module")
def billing_database(server_url: str) -> Iterator[str]:
    with fresh_database(server_url, "bp_billing") as url:
        yield url


@pytest.fixture(scope="module")
async def stack(billing_database: str) -> AsyncIterator[Stack]:
    async with billing_stack(billing_database) as running:
        yield running


@contextlib.asynccontextmanager
async def stripe_sdk(stack: Stack) -> AsyncIterator[stripe.StripeClient]:
    """The official SDK pointed at the stack's emulator (as a dashboard user would drive
    Stripe: test clocks, customers), with its connections closed afterwards."""
    http = stripe.HTTPXClient()
    try:
        yield stripe.StripeClient(
            EMULATOR_KEY, base_addresses={"api": stack.emulator_url}, http_client=http
        )
    finally:
        await http.close_async()  # type: ignore[no-untyped-call]
        http.close()  # type: ignore[no-untyped-call]


async def pay(url: str, card: str = "4242 4242 4242 4242") -> httpx.Response:
    """What a browser does on the hosted checkout page."""
    async with httpx.AsyncClient(timeout=20) as http:
        page = await http.get(url)
        assert page.status_code == 200 and "Card number" in page.text
        return await http.post(url, data={"card": card})
