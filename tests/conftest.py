"""Shared fixtures: one throw-away database per test session (embedded PostgreSQL, or a
new database on the server in DATABASE_URL), migrated to head."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool

from billing_core.clock import FrozenClock
from billing_core.db.embedded import drop_database, ensure_database, start_embedded
from billing_core.db.migrate import upgrade
from billing_core.db.pool import open_pool
from billing_core.quota.engine import QuotaEngine
from tests import factories

# signs the test control planes' billing links and sessions (tests forge expired ones with it)
LINK_SECRET = "tests-billing-link-secret-" + "x" * 16


@pytest.fixture(scope="session")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    configured = os.environ.get("DATABASE_URL", "").strip()
    if configured:
        yield configured
        return
    base = Path("/tmp") / f"bp-pg-{os.getpid()}"  # short: the socket path must stay < 100 chars
    server, url = start_embedded(base / "data", throwaway=True)
    try:
        yield url
    finally:
        server.cleanup()


@contextlib.contextmanager
def fresh_database(server_url: str, prefix: str) -> Iterator[str]:
    """A new database on the server, migrated to head, dropped afterwards."""
    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(3)}"
    url = ensure_database(server_url, name)
    upgrade(url)
    try:
        yield url
    finally:
        drop_database(server_url, name)


@pytest.fixture(scope="session")
def database_url(server_url: str) -> Iterator[str]:
    with fresh_database(server_url, "bp_test") as url:
        yield url


@pytest.fixture(scope="session")
async def pool(database_url: str) -> AsyncIterator[AsyncConnectionPool[Any]]:
    pool = await open_pool(database_url, 8)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(datetime(2026, 3, 10, 12, 0, tzinfo=UTC))


@pytest.fixture
def engine(pool: AsyncConnectionPool[Any], clock: FrozenClock) -> QuotaEngine:
    return factories.engine(pool, clock)


@pytest.fixture
def uid() -> str:
    """A fresh suffix: tests share one database and never collide on ids."""
    return secrets.token_hex(4)


@pytest.fixture(scope="session")
async def sidecar(database_url: str) -> AsyncIterator[Any]:
    """A real sidecar on a free port, shared by the gRPC tests."""
    from billing_core.settings import Settings
    from quota_service.server import create_server

    # no background sweep: the other tests' rows on this shared database are dated by frozen
    # clocks in the past, and a sweep on the real clock would expire them mid-test
    settings = Settings(
        database_url=database_url,
        grpc_port=0,
        metrics_port=-1,
        db_pool_size=8,
        reservation_sweep_seconds=24 * 3600,
    )
    server = await create_server(settings)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(grace=1)


@dataclass(frozen=True)
class ControlPlane:
    url: str
    key: str
    app: Any


@contextlib.asynccontextmanager
async def running_control_plane(database_url: str, **changes: Any) -> AsyncIterator[ControlPlane]:
    """The real control plane (uvicorn) on a free port of this event loop, with a key (and
    a billing link secret unless `changes` say otherwise)."""
    import socket

    import uvicorn

    from billing_core.billing.api_keys import create_api_key
    from billing_core.db.unit_of_work import Database
    from billing_core.settings import Settings
    from control_plane.app import create_app

    db = await Database.open(database_url, 1)
    try:
        async with db.transaction() as uow:
            key = (await create_api_key(uow, "tests", "tests", datetime.now(UTC))).key
    finally:
        await db.close()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    settings = Settings(
        database_url=database_url,
        billing_link_secret=LINK_SECRET,
        public_base_url=f"http://127.0.0.1:{port}",
        # tests refuse wrong keys by the dozen from one address: the 429 after repeated
        # failures is tested on a control plane of its own (test_api_keys)
        auth_failures_per_minute=0,
    )
    app = create_app(settings.with_changes(**changes) if changes else settings)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    try:
        yield ControlPlane(f"http://127.0.0.1:{port}", key, app)
    finally:
        server.should_exit = True
        await task
        sock.close()


@pytest.fixture(scope="session")
async def control_plane(database_url: str) -> AsyncIterator[ControlPlane]:
    async with running_control_plane(database_url) as running:
        yield running


@pytest.fixture
def scratch_database(server_url: str) -> Iterator[str]:
    """A migrated database of its own, for tests that would litter the shared one."""
    with fresh_database(server_url, "bp_scratch") as url:
        yield url
