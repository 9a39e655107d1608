"""The billing overview's server time for a tenant with a long history against a tenant
with none: the page reads counters, the daily rollup and the latest rows by index, so
the history must not show in its time. A control plane process of its own on the
database with the history; the time is the page's Server-Timing (request to first byte)."""

from __future__ import annotations

import os
import secrets
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime

import httpx

from bench.data import wide_plan_id
from bench.measure import ROOT, free_port
from bench.report import Result
from billing_core.billing.api_keys import create_api_key
from billing_core.db.pool import open_pool
from billing_core.db.unit_of_work import Database

EMPTY, HEAVY = "page-empty", "page-heavy"
SERVER = "control plane"
SCENARIOS = {EMPTY: "overview, no records", HEAVY: "overview, history"}


async def add_page_tenants(database_url: str, rows: int) -> float:
    """Two tenants on the same plan; the heavy one with `rows` records over 400 days up to
    now (the last 30 days and today among them). Returns the seconds the insert took."""
    started = time.monotonic()
    now = datetime.now(UTC)
    pool = await open_pool(database_url, 1)
    try:
        async with pool.connection() as conn:
            plan_id = await wide_plan_id(conn)
            for tenant in (EMPTY, HEAVY):
                await conn.execute(
                    "INSERT INTO tenants (tenant_id, name, timezone, created_at)"
                    " VALUES (%s, %s, 'Europe/Berlin', %s)",
                    (tenant, tenant, now),
                )
                await conn.execute(
                    "INSERT INTO subscriptions (tenant_id, subscription_id, plan_id, status,"
                    " is_current, billing_cycle_anchor, created_at, updated_at)"
                    " VALUES (%s, %s, %s, 'active', true, %s, %s, %s)",
                    (tenant, f"sub-{tenant}", plan_id, now, now, now),
                )
            await conn.execute(
                "INSERT INTO usage_records (tenant_id, usage_record_id, resource, amount, kind,"
                " request_id, cost_micros, occurred_at)"
                " SELECT %s, 'ur_page_' || i, 'messages', 1 + i %% 7, 'consume', 'p' || i,"
                " i %% 1000, %s - (%s - i) * (interval '400 days' / %s)"
                " FROM generate_series(1, %s) i",
                (HEAVY, now, rows, rows, rows),
            )
            await conn.execute("ANALYZE usage_records")
    finally:
        await pool.close()
    return time.monotonic() - started


async def _admin_key(database_url: str) -> str:
    db = await Database.open(database_url, 1)
    try:
        async with db.transaction() as uow:
            return (await create_api_key(uow, "bench", "bench-pages", datetime.now(UTC))).key
    finally:
        await db.close()


class PageServer:
    """`python -m control_plane` on the database, with a browser session per tenant."""

    def __init__(self, database_url: str, key: str) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "CONTROL_PLANE_PORT": str(port),
            "PUBLIC_BASE_URL": self.url,
            "BILLING_LINK_SECRET": secrets.token_urlsafe(32),
            "LOG_LEVEL": "warning",
        }
        self.process = subprocess.Popen([sys.executable, "-m", "control_plane"], env=env, cwd=ROOT)
        self.api = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"})
        deadline = time.monotonic() + 30
        while True:
            try:
                if self.api.get("/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the control plane did not become ready")
            time.sleep(0.1)
        self.browsers = {t: self._session(t) for t in (EMPTY, HEAVY)}

    def _session(self, tenant: str) -> httpx.Client:
        link = self.api.post(f"/v1/tenants/{tenant}/billing-links", json={})
        link.raise_for_status()
        browser = httpx.Client(timeout=30)
        browser.get(link.json()["url"])  # sets the session cookie
        return browser

    def overview_ms(self, tenant: str) -> float:
        r = self.browsers[tenant].get(f"{self.url}/billing")
        r.raise_for_status()
        return float(r.headers["server-timing"].removeprefix("app;dur="))

    def stop(self) -> None:
        for client in (self.api, *self.browsers.values()):
            client.close()
        self.process.terminate()
        self.process.wait(timeout=15)


def start(database_url: str) -> PageServer:
    import asyncio

    server = PageServer(database_url, asyncio.run(_admin_key(database_url)))
    for tenant in (EMPTY, HEAVY):
        server.overview_ms(tenant)  # the first view of the day settles the daily rollup
    return server


def measure(server: PageServer, renders: int) -> list[Result]:
    """One round: `renders` views of each tenant's overview, alternating; the median time."""
    times: dict[str, list[float]] = {EMPTY: [], HEAVY: []}
    started = time.monotonic()
    for _ in range(renders):
        for tenant in (EMPTY, HEAVY):
            times[tenant].append(server.overview_ms(tenant))
    per_s = 2 * renders / (time.monotonic() - started)
    return [
        Result(
            SERVER,
            SCENARIOS[tenant],
            1,
            per_s / 2,
            statistics.median(found),
            _quantile(found, 0.99),
            max(found),
            0.0,
            0.0,
            0,
        )
        for tenant, found in times.items()
    ]


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
