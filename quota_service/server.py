"""Build and run the sidecar: gRPC (quota, Envoy's rate-limit service, health, reflection),
metrics, background sweeps."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer as AsyncHealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server
from quota.v1 import quota_service_pb2 as pb

from billing_core.clock import Clock, SystemClock
from billing_core.db.unit_of_work import Database
from billing_core.quota.engine import QuotaEngine, QuotaRules
from billing_core.quota.sweeps import Sweeper
from billing_core.settings import Settings
from quota_service import ratelimit
from quota_service.coalescer import Coalescer
from quota_service.metrics import EngineCollector, Metrics, PoolCollector
from quota_service.servicer import QuotaServicer, add_to_server

log = structlog.get_logger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["QuotaService"].full_name
_OPEN_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class TokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Requires `authorization: Bearer <token>` on quota calls when a token is configured."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

        async def deny(request: object, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        if details.method.startswith(_OPEN_METHODS):
            return await continuation(details)
        sent = dict(details.invocation_metadata or ()).get("authorization", "")
        given = sent.encode() if isinstance(sent, str) else sent
        if hmac.compare_digest(given, self._expected):
            return await continuation(details)
        return self._deny


@dataclass
class QuotaServer:
    settings: Settings
    server: grpc.aio.Server
    database: Database
    engine: QuotaEngine
    sweeper: Sweeper
    health: AsyncHealthServicer
    registry: CollectorRegistry
    port: int
    coalescer: Coalescer | None = None
    metrics: Metrics | None = None
    metrics_port: int = 0
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _metrics_server: Any = None

    async def start(self) -> None:
        if self.coalescer is not None:
            self.coalescer.start()
        await self.server.start()
        if self.settings.metrics_port >= 0 and self.settings.metrics_port != 0:
            self._metrics_server, _ = start_http_server(
                self.settings.metrics_port, addr=self.settings.grpc_host, registry=self.registry
            )
            self.metrics_port = self._metrics_server.server_port
        await self._set_serving(True)
        self._tasks = [
            asyncio.create_task(self._watch_database(), name="db-health"),
            asyncio.create_task(self._sweep(), name="sweep"),
        ]
        log.info(
            "quota_service_started",
            address=f"{self.settings.grpc_host}:{self.port}",
            metrics_port=self.metrics_port,
        )

    async def _set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self.health.set("", status)
        await self.health.set(SERVICE_NAME, status)

    async def _watch_database(self) -> None:
        serving = True
        while True:
            ok = await self.database.ping()
            if ok != serving:
                serving = ok
                await self._set_serving(ok)
                log.warning("database_health_changed", serving=ok)
            await asyncio.sleep(1.0)

    async def _sweep(self) -> None:
        """Every RESERVATION_SWEEP_SECONDS: release expired reservations and expire grants
        past their expiry of tenants no call reaches (a call clears its own tenant's on the
        way), and forget expired idempotency keys. Several sidecars may sweep at once: they
        skip each other's rows."""
        while True:
            await asyncio.sleep(self.settings.reservation_sweep_seconds)
            try:
                swept = await self.sweeper.lapsed()
                self._count_swept("reservations", swept.reservations_released)
                self._count_swept("grants", swept.grants_expired)
                self._count_swept("idempotency_keys", await self.sweeper.idempotency_keys())
            except Exception as exc:  # the sweep must outlive a database outage
                log.warning("sweep_failed", error=str(exc))

    def _count_swept(self, kind: str, swept: int) -> None:
        if swept:
            log.info("swept", kind=kind, count=swept)
            if self.metrics is not None:
                self.metrics.swept.labels(kind).inc(swept)

    async def stop(self, grace: float | None = None) -> None:
        """Drain: report NOT_SERVING, finish in-flight calls (up to grace), then close."""
        grace = self.settings.drain_seconds if grace is None else grace
        await self.health.enter_graceful_shutdown()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.server.stop(grace)
        if self.coalescer is not None:
            await self.coalescer.stop()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        await self.database.close()
        log.info("quota_service_stopped")

    async def wait(self) -> None:
        await self.server.wait_for_termination()


async def create_server(settings: Settings, *, clock: Clock | None = None) -> QuotaServer:
    """Open the database and build a server bound to settings.grpc_host:grpc_port (0 = a
    free port)."""
    clock = clock or SystemClock()
    database = await Database.open(
        settings.require_database(),
        settings.db_pool_size,
        batch_size=settings.coalesce_lanes if settings.coalesce_requests else 0,
        acquire_timeout_s=settings.db_acquire_timeout_ms / 1000,
        quota_only=True,
        batch_lock_timeout_ms=settings.batch_lock_timeout_ms,
        prepared=settings.db_prepared_statements,
        generic_plans=settings.db_generic_plans,
    )
    engine = QuotaEngine(
        database.quota_store,
        clock,
        QuotaRules(
            idempotency_ttl=timedelta(hours=settings.idempotency_ttl_hours),
            past_due_grace=timedelta(days=settings.past_due_grace_days),
            batch_lock_timeout_s=settings.batch_lock_timeout_ms / 1000,
        ),
    )
    sweeper = Sweeper(engine, database.quota_store, clock)
    interceptors = [TokenInterceptor(settings.grpc_auth_token)] if settings.grpc_auth_token else []
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 1 << 20)],
    )
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    coalescer = (
        Coalescer(
            engine,
            lanes=settings.coalesce_lanes,
            gather_s=settings.coalesce_gather_us / 1_000_000,
            stall_s=settings.coalesce_stall_ms / 1000,
            on_batch=metrics.batch_size.observe,
        )
        if settings.coalesce_requests
        else None
    )
    registry.register(EngineCollector(engine, coalescer))
    registry.register(PoolCollector(database))
    servicer = QuotaServicer(engine, metrics, coalescer)
    add_to_server(servicer, server)
    admit_all = coalescer.admit_all if coalescer is not None else engine.admit_all
    ratelimit.add_to_server(
        ratelimit.RateLimitServicer(admit_all, settings.rls_domain, metrics, clock), server
    )
    health = AsyncHealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            ratelimit.SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    address = f"{settings.grpc_host}:{settings.grpc_port}"
    if settings.grpc_tls_cert_file:
        port = server.add_secure_port(address, _tls_credentials(settings))
    else:
        port = server.add_insecure_port(address)
    return QuotaServer(
        settings, server, database, engine, sweeper, health, registry, port, coalescer, metrics
    )


def _tls_credentials(settings: Settings) -> grpc.ServerCredentials:
    key = Path(settings.grpc_tls_key_file).read_bytes()
    cert = Path(settings.grpc_tls_cert_file).read_bytes()
    return grpc.ssl_server_credentials([(key, cert)])
