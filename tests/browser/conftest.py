"""The real stack for the browser tests — database, sidecar, control plane, local Stripe —
served from a thread of its own (Playwright's sync API owns the test's thread), and
Debian's Chromium driven by pytest-playwright. Every page state a test reaches can be
checked with axe-core (vendored under vendor/axe-core, MPL-2.0)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import re
import threading
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect
from quota_client import QuotaClient

from billing_core.billing.demo import seed_demo
from billing_core.db.unit_of_work import Database
from billing_core.settings import Settings
from quota_service.server import create_server
from tests.billing.conftest import Stack, billing_stack
from tests.conftest import fresh_database

T = TypeVar("T")
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
AXE = Path(__file__).parent / "vendor" / "axe-core" / "axe.min.js"
# Chromium without the calls home it would make (this machine has no internet)
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


class ShiftedClock:
    """The system clock plus an offset the test moves (the sidecar and the control plane
    share it, as two processes share the wall clock)."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset


@dataclass
class Live:
    """The running stack, seen from the test's thread."""

    stack: Stack
    grpc_target: str
    clock: ShiftedClock
    loop: asyncio.AbstractEventLoop
    _http: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self._http = httpx.Client(
            base_url=self.stack.url,
            headers={"Authorization": f"Bearer {self.stack.key}"},
            timeout=30,
        )

    @property
    def url(self) -> str:
        return self.stack.url

    def run(self, work: Awaitable[T], timeout: float = 60) -> T:
        """Run a coroutine on the stack's event loop (the SDK, the emulator, SQL)."""

        async def wrapped() -> T:
            return await work

        return asyncio.run_coroutine_threadsafe(wrapped(), self.loop).result(timeout)

    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self._http.request(method, path, **kwargs)

    def ok(self, method: str, path: str, **kwargs: Any) -> Any:
        r = self.api(method, path, **kwargs)
        assert r.status_code < 300, (method, path, r.status_code, r.text)
        return r.json()

    def tenant(self, tenant_id: str, name: str, timezone: str = "Europe/Berlin") -> None:
        self.ok(
            "POST",
            "/v1/tenants",
            json={
                "tenant_id": tenant_id,
                "name": name,
                "email": f"owner@{tenant_id}.example",
                "timezone": timezone,
            },
        )

    def billing_link(self, tenant_id: str) -> str:
        link = self.ok("POST", f"/v1/tenants/{tenant_id}/billing-links", json={})
        url: str = link["url"]
        return url

    def settle(self) -> None:
        """Wait until the local Stripe has delivered every webhook it queued."""
        self.run(self.stack.settle())

    def sql(self, statement: str, *args: Any) -> list[tuple[Any, ...]]:
        return self.run(self.stack.fetch(statement, *args))

    def quota(self) -> QuotaClient:
        return QuotaClient(self.grpc_target, retries=0, default_timeout=10)

    def close(self) -> None:
        self._http.close()


def _serve(database_url: str, handed: queue.Queue[Any]) -> None:
    """The stack's thread: everything on one event loop until told to stop."""

    async def main() -> None:
        clock = ShiftedClock()
        async with billing_stack(database_url, clock=clock) as stack:
            sidecar_settings: Settings = stack.settings.with_changes(
                grpc_port=0, metrics_port=-1, reservation_sweep_seconds=3600
            )
            server = await create_server(sidecar_settings, clock=clock)
            await server.start()
            stopping = asyncio.Event()
            try:
                loop = asyncio.get_running_loop()
                handed.put((Live(stack, f"127.0.0.1:{server.port}", clock, loop), stopping))
                await stopping.wait()
            finally:
                await server.stop(grace=1)

    try:
        asyncio.run(main())
    except BaseException as exc:  # the test's thread raises it
        handed.put(exc)


@contextlib.contextmanager
def live_stack(database_url: str) -> Iterator[Live]:
    handed: queue.Queue[Any] = queue.Queue()
    thread = threading.Thread(target=_serve, args=(database_url, handed), daemon=True)
    thread.start()
    got = handed.get(timeout=120)
    if isinstance(got, BaseException):
        raise got
    live, stopping = got
    try:
        yield live
    finally:
        live.close()
        live.loop.call_soon_threadsafe(stopping.set)
        thread.join(timeout=60)


@pytest.fixture(scope="module")
def live(server_url: str) -> Iterator[Live]:
    """A stack of this test module's own, with the demo plans Free, Pro (14-day trial),
    Team (with an upgrade grant) and Enterprise."""
    with fresh_database(server_url, "bp_browser") as url, live_stack(url) as running:

        async def seed() -> None:
            async with Database(running.stack.pool).transaction() as uow:
                await seed_demo(uow, running.clock.now())

        running.run(seed())
        yield running


# --- the browser -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict[str, Any]) -> dict[str, Any]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install chromium (or set CHROMIUM_PATH)")
    return {**browser_type_launch_args, "executable_path": CHROMIUM, "args": CHROMIUM_ARGS}


@pytest.fixture(scope="session")
def browser_context_args(browser_context_args: dict[str, Any]) -> dict[str, Any]:
    return {**browser_context_args, "locale": "en-GB", "viewport": {"width": 1100, "height": 900}}


@pytest.fixture(autouse=True)
def _axe_in_every_page(context: BrowserContext) -> None:
    context.add_init_script(path=str(AXE))


def new_context(browser: Browser, **options: Any) -> BrowserContext:
    """A second person's browser (its own cookies), with axe in its pages too."""
    context = browser.new_context(locale="en-GB", **options)
    context.add_init_script(path=str(AXE))
    return context


def assert_accessible(page: Page) -> None:
    """axe-core on the page as it is now: no serious or critical violation."""
    page.wait_for_function("() => window.axe !== undefined")
    result = page.evaluate(
        "async () => (await axe.run(document, {resultTypes: ['violations']})).violations"
    )
    bad = [
        f"{v['id']} ({v['impact']}): {v['help']} — "
        + "; ".join(n["target"][0] if n["target"] else "?" for n in v["nodes"][:5])
        for v in result
        if v["impact"] in ("serious", "critical")
    ]
    assert not bad, f"{page.url}: " + "\n".join(bad)


def sign_in(page: Page, live: Live) -> None:
    """Through the admin sign-in page with the stack's admin key."""
    page.goto(f"{live.url}/admin")
    expect(page).to_have_url(re.compile(r"/admin/login"))
    page.get_by_label("Admin API key").fill(live.stack.key)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Plans", exact=True)).to_be_visible()
