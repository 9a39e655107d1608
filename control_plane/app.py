"""create_app(settings): routes, middleware and lifespan wired explicitly."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from psycopg_pool import AsyncConnectionPool
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from billing_core.db.migrate import head_revision
from billing_core.db.pool import open_pool, ping
from billing_core.settings import Settings


def create_app(settings: Settings) -> Starlette:
    registry = CollectorRegistry()
    requests_total = Counter(
        "control_plane_requests",
        "HTTP requests by route and status",
        ["route", "status"],
        registry=registry,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        pool: AsyncConnectionPool[Any] = await open_pool(settings.require_database(), 4)
        app.state.pool = pool
        try:
            yield
        finally:
            await pool.close()

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        pool: AsyncConnectionPool[Any] = request.app.state.pool
        database = await ping(pool)
        migrations = database and await _revision(pool) == head_revision()
        ready = database and migrations
        body = {
            "status": "ready" if ready else "not ready",
            "database": database,
            "migrations_current": migrations,
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app = Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics),
        ],
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.requests_total = requests_total
    return app


async def _revision(pool: AsyncConnectionPool[Any]) -> str | None:
    try:
        async with pool.connection(timeout=2.0) as conn:
            cur = await conn.execute("SELECT version_num FROM alembic_version")
            row = await cur.fetchone()
    except Exception:
        return None
    return None if row is None else str(row[0])
