"""The sidecar over real gRPC: responses, status codes, health, reflection, auth, drain."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from psycopg_pool import AsyncConnectionPool
from quota.v1 import quota_service_pb2_grpc
from quota_client import AsyncQuotaClient, FailureMode, QuotaUnavailable, Tokens, pb

from billing_core.billing.model import quota
from billing_core.db.embedded import drop_database, ensure_database
from billing_core.db.migrate import upgrade
from billing_core.db.urls import libpq_url
from billing_core.settings import Settings
from quota_service.server import QuotaServer, create_server
from tests import factories as f

Pool = AsyncConnectionPool[Any]
NOW = datetime.now(UTC)


def target(server: QuotaServer) -> str:
    return f"127.0.0.1:{server.port}"


async def test_check_and_consume_over_grpc(sidecar: QuotaServer, pool: Pool, uid: str) -> None:
    await f.price(
        pool, "openai", f"gpt-{uid}", 1_000_000, 2_000_000, datetime(2020, 1, 1, tzinfo=UTC)
    )
    plan = await f.plan(
        pool, NOW, uid, [quota("tokens", "daily", 1000), quota("tokens", "monthly", 1500)]
    )
    t = await f.tenant(pool, NOW, f"t-{uid}", plan, timezone="Europe/Berlin")
    async with AsyncQuotaClient(target(sidecar)) as client:
        tokens = Tokens("openai", f"gpt-{uid}", 300, 100)
        first = await client.check_and_consume(
            t, "tokens", 400, request_id="a", tokens=tokens, labels={"agent": "writer"}
        )
        assert first.allowed and first.reason == pb.REASON_ALLOWED
        assert first.cost_micros == 500 and first.usage_record_id and not first.replayed
        assert [(w.period, w.limit, w.used, w.remaining) for w in first.windows] == [
            (pb.PERIOD_DAILY, 1000, 400, 600),
            (pb.PERIOD_MONTHLY, 1500, 400, 1100),
        ]
        assert first.windows[0].HasField("resets_at")
        again = await client.check_and_consume(
            t, "tokens", 400, request_id="a", tokens=tokens, labels={"agent": "writer"}
        )
        assert again.replayed and again.usage_record_id == first.usage_record_id
        denied = await client.check_and_consume(t, "tokens", 700)
        assert not denied.allowed and denied.reason == pb.REASON_QUOTA_EXCEEDED
        assert denied.message.startswith("Daily tokens limit of 1,000 reached; resets at 00:00 ")
        usage = await client.get_usage(t)
        assert usage.plan_id == plan and usage.subscription_status == "active"
        assert [(r.resource, [w.used for w in r.windows]) for r in usage.resources] == [
            ("tokens", [400, 400])
        ]
    records = await f.fetch(pool, "SELECT labels FROM usage_records WHERE tenant_id = %s", t)
    assert records == [({"agent": "writer"},)]


async def test_coalesced_calls_keep_to_the_lanes_own_connection(
    sidecar: QuotaServer, pool: Pool, uid: str
) -> None:
    """Batches run on the lanes' pool (one connection per lane), not on the shared pool that
    hands its connections out in turn: one warm backend decides every batch."""
    batch_pool = sidecar.database.batch_pool
    assert batch_pool is not None and batch_pool.max_size == sidecar.settings.coalesce_lanes == 1
    plan = await f.plan(pool, NOW, uid, [quota("messages", "daily", 100)])
    t = await f.tenant(pool, NOW, f"t-{uid}", plan)
    batches = batch_pool.get_stats().get("requests_num", 0)
    shared = sidecar.database.pool.get_stats().get("requests_num", 0)
    sizes_before = sidecar.registry.get_sample_value("quota_coalesced_batch_size_sum") or 0
    async with AsyncQuotaClient(target(sidecar)) as client:
        for _ in range(12):
            assert (await client.check_and_consume(t, "messages", 1)).allowed
    assert batch_pool.get_stats().get("requests_num", 0) - batches == 12
    assert (
        sidecar.database.pool.get_stats().get("requests_num", 0) - shared < 12
    )  # health pings only
    # every batch's size reaches the metrics: here twelve batches of one
    sizes = sidecar.registry.get_sample_value("quota_coalesced_batch_size_sum") or 0
    assert sizes - sizes_before == 12


async def test_reserve_context_manager_commits_or_releases(
    sidecar: QuotaServer, pool: Pool, uid: str
) -> None:
    plan = await f.plan(pool, NOW, uid, [quota("research_runs", "monthly", 5)])
    t = await f.tenant(pool, NOW, f"t-{uid}", plan)
    async with AsyncQuotaClient(target(sidecar)) as client:
        async with await client.reserve(t, "research_runs", 3) as r:
            assert r.allowed and r.response.HasField("expires_at")
            done = await r.commit(2)
        assert done.windows[0].used == 2
        with pytest.raises(RuntimeError, match="boom"):
            async with await client.reserve(t, "research_runs", 3) as r2:
                assert r2.allowed
                raise RuntimeError("boom")
        usage = await client.get_usage(t, "research_runs")
        assert usage.resources[0].windows[0].used == 2  # the failed work's hold was released


@pytest.mark.parametrize(
    ("call", "code", "text"),
    [
        ("amount0", grpc.StatusCode.INVALID_ARGUMENT, "amount must be a positive integer"),
        ("no-tenant", grpc.StatusCode.INVALID_ARGUMENT, "tenant_id is required"),
        ("bad-resource", grpc.StatusCode.INVALID_ARGUMENT, "unknown resource"),
        ("unknown-tenant", grpc.StatusCode.NOT_FOUND, "unknown tenant"),
        ("unknown-reservation", grpc.StatusCode.NOT_FOUND, "unknown reservation"),
        ("free-not-cumulative", grpc.StatusCode.INVALID_ARGUMENT, "no cumulative quota"),
        ("ttl-too-long", grpc.StatusCode.INVALID_ARGUMENT, "ttl_seconds"),
        ("nul-label", grpc.StatusCode.INVALID_ARGUMENT, "labels must not contain NUL"),
        ("nul-request-id", grpc.StatusCode.INVALID_ARGUMENT, "request_id must not contain NUL"),
    ],
)
async def test_status_codes(
    sidecar: QuotaServer, pool: Pool, uid: str, call: str, code: grpc.StatusCode, text: str
) -> None:
    plan = await f.plan(pool, NOW, uid, [quota("messages", "daily", 5)])
    t = await f.tenant(pool, NOW, f"t-{uid}", plan)
    async with grpc.aio.insecure_channel(target(sidecar)) as channel:
        stub = quota_service_pb2_grpc.QuotaServiceStub(channel)
        calls: dict[str, Callable[[], Awaitable[object]]] = {
            "amount0": lambda: stub.CheckAndConsume(
                pb.CheckAndConsumeRequest(
                    tenant_id=t, resource="messages", amount=0, request_id="x"
                )
            ),
            "no-tenant": lambda: stub.CheckAndConsume(
                pb.CheckAndConsumeRequest(resource="messages", amount=1, request_id="x")
            ),
            "nul-label": lambda: stub.CheckAndConsume(
                pb.CheckAndConsumeRequest(
                    tenant_id=t, resource="messages", amount=1, request_id="x", labels={"a": "\x00"}
                )
            ),
            "nul-request-id": lambda: stub.CheckAndConsume(
                pb.CheckAndConsumeRequest(
                    tenant_id=t, resource="messages", amount=1, request_id="x\x00"
                )
            ),
            "bad-resource": lambda: stub.CheckAndConsume(
                pb.CheckAndConsumeRequest(tenant_id=t, resource="gold", amount=1, request_id="x")
            ),
            "unknown-tenant": lambda: stub.CheckAndConsume(
                pb.CheckAndConsumeRequest(
                    tenant_id=f"ghost-{uid}", resource="messages", amount=1, request_id="x"
                )
            ),
            "unknown-reservation": lambda: stub.Commit(
                pb.CommitRequest(tenant_id=t, reservation_id="rsv_nope", amount=1)
            ),
            "free-not-cumulative": lambda: stub.Free(
                pb.FreeRequest(tenant_id=t, resource="messages", amount=1, request_id="x")
            ),
            "ttl-too-long": lambda: stub.Reserve(
                pb.ReserveRequest(
                    tenant_id=t, resource="messages", amount=1, request_id="x", ttl_seconds=3601
                )
            ),
        }
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await calls[call]()
    assert caught.value.code() == code
    assert text in (caught.value.details() or "")
    assert await f.fetch(pool, "SELECT 1 FROM usage_records WHERE tenant_id = %s", t) == []


async def test_health_and_reflection(sidecar: QuotaServer) -> None:
    async with grpc.aio.insecure_channel(target(sidecar)) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "quota.v1.QuotaService"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        async for reply in stub.ServerReflectionInfo(iter([request])):
            names = {s.name for s in reply.list_services_response.service}
            break
    assert {"quota.v1.QuotaService", "grpc.health.v1.Health"} <= names


async def _private_sidecar(server_url: str, **changes: Any) -> tuple[QuotaServer, str]:
    name = f"bp_private_{secrets.token_hex(4)}"
    url = ensure_database(server_url, name)
    upgrade(url)
    settings = Settings(database_url=url, grpc_port=0, metrics_port=-1, db_pool_size=2, **changes)
    server = await create_server(settings)
    await server.start()
    return server, name


async def test_health_reports_not_serving_while_the_database_is_unreachable(
    server_url: str,
) -> None:
    server, name = await _private_sidecar(server_url)
    admin = await psycopg.AsyncConnection.connect(libpq_url(server_url), autocommit=True)
    try:
        async with grpc.aio.insecure_channel(target(server)) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )
            status = None
            for _ in range(50):
                reply = await health.Check(health_pb2.HealthCheckRequest())
                status = reply.status
                if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                await asyncio.sleep(0.2)
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            async with AsyncQuotaClient(target(server), retries=1, default_timeout=5) as client:
                with pytest.raises(QuotaUnavailable):
                    await client.check_and_consume("anyone", "messages", 1)
                opened = await client.check_and_consume(
                    "anyone", "messages", 1, failure_mode=FailureMode.OPEN
                )
                closed = await client.check_and_consume(
                    "anyone", "messages", 1, failure_mode=FailureMode.CLOSED
                )
            assert opened.allowed and not closed.allowed
            assert "fail-open" in opened.message and "fail-closed" in closed.message
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            for _ in range(50):
                reply = await health.Check(health_pb2.HealthCheckRequest())
                status = reply.status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    break
                await asyncio.sleep(0.2)
            assert status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await server.stop(grace=1)
        await admin.close()
        drop_database(server_url, name)


async def test_shared_token_is_required_except_for_health(server_url: str) -> None:
    server, name = await _private_sidecar(server_url, grpc_auth_token="s3cret")
    try:
        async with AsyncQuotaClient(target(server), retries=0) as anonymous:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await anonymous.get_usage("t")
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        async with AsyncQuotaClient(target(server), token="s3cret") as client:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await client.get_usage("unknown")
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND  # got past the check
        async with grpc.aio.insecure_channel(target(server)) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(grace=1)
        drop_database(server_url, name)


async def test_shutdown_drains_in_flight_calls(server_url: str) -> None:
    server, name = await _private_sidecar(server_url)
    url = server.settings.database_url
    pool = server.database.pool
    try:
        plan = await f.plan(pool, NOW, "drain", [quota("messages", "overall", 10)])
        t = await f.tenant(pool, NOW, "drain-tenant", plan)
        async with AsyncQuotaClient(target(server)) as client:
            assert (await client.check_and_consume(t, "messages", 1)).allowed
            # hold the counter row so the next call stays in flight
            blocker = await psycopg.AsyncConnection.connect(libpq_url(url))
            await blocker.execute(
                "SELECT 1 FROM usage_counters WHERE tenant_id = %s FOR UPDATE", (t,)
            )
            in_flight = asyncio.create_task(
                client.check_and_consume(t, "messages", 2, request_id="slow", timeout=10)
            )
            await asyncio.sleep(0.3)
            stopping = asyncio.create_task(server.stop(grace=5))
            await asyncio.sleep(0.3)
            assert not in_flight.done()
            await blocker.rollback()
            await blocker.close()
            decision = await in_flight
            await stopping
        assert decision.allowed and decision.windows[0].used == 3
    finally:
        drop_database(server_url, name)


async def test_the_running_sidecar_forgets_expired_idempotency_keys(server_url: str) -> None:
    server, name = await _private_sidecar(server_url, reservation_sweep_seconds=1)
    pool = server.database.pool
    try:
        plan = await f.plan(pool, NOW, "keys", [quota("messages", "overall", 10)])
        t = await f.tenant(pool, NOW, "keys-tenant", plan)
        async with AsyncQuotaClient(target(server)) as client:
            assert (await client.check_and_consume(t, "messages", 1, request_id="kept")).allowed
            assert (await client.check_and_consume(t, "messages", 1, request_id="aged")).allowed
        async with pool.connection() as conn:  # as if a day had passed for one of them
            await conn.execute(
                "UPDATE idempotency_keys SET expires_at = now() - interval '1 second'"
                " WHERE request_id = 'aged'"
            )
        swept: float | None = None
        for _ in range(50):  # the sweep runs every second and counts what it deleted
            await asyncio.sleep(0.1)
            swept = server.registry.get_sample_value(
                "quota_swept_total", {"kind": "idempotency_keys"}
            )
            if swept:
                break
        assert swept == 1
        left = await f.fetch(pool, "SELECT request_id FROM idempotency_keys")
        assert left == [("kept",)]
    finally:
        await server.stop(grace=1)
        drop_database(server_url, name)


async def test_the_running_sidecar_clears_a_lapsed_grant_with_the_call_that_meets_it(
    server_url: str,
) -> None:
    """A grant past its expiry is expired by the first call for its tenant (the periodic
    sweep is an hour away here), in that call's own batch: nothing falls back."""
    server, name = await _private_sidecar(server_url, reservation_sweep_seconds=3600)
    pool = server.database.pool
    try:
        assert server.coalescer is not None
        plan = await f.plan(pool, NOW, "tidy", [quota("messages", "overall", 10)])
        t = await f.tenant(pool, NOW, "tidy-tenant", plan)
        await f.credit(
            pool, t, 70, NOW - timedelta(hours=2), reason="trial",
            expires_at=NOW - timedelta(hours=1),
        )  # fmt: skip
        balance = await f.fetch(pool, "SELECT balance_micros FROM wallets WHERE tenant_id = %s", t)
        assert balance == [(70,)]
        async with AsyncQuotaClient(target(server)) as client:
            assert (await client.check_and_consume(t, "messages", 1)).allowed
            balance = await f.fetch(
                pool, "SELECT balance_micros FROM wallets WHERE tenant_id = %s", t
            )
            assert balance == [(0,)]
            assert (await client.check_and_consume(t, "messages", 1)).allowed
            fallbacks = {
                reason: server.registry.get_sample_value(
                    "quota_batch_fallbacks_total", {"reason": reason}
                )
                for reason in ("race", "locked", "refused", "failed")
            }
            assert fallbacks == {"race": 0, "locked": 0, "refused": 0, "failed": 0}
        ledger = await f.fetch(
            pool, "SELECT kind, delta_micros FROM wallet_ledger WHERE tenant_id = %s ORDER BY 1", t
        )
        assert ledger == [("expire", -70), ("grant", 70)]
    finally:
        await server.stop(grace=1)
        drop_database(server_url, name)


async def test_the_running_sidecar_counts_stalled_batches_and_lost_connections(
    server_url: str,
) -> None:
    """What an operator sees when a row lock is held elsewhere and when a backend dies:
    quota_batch_stalled_total, the batch's fallback past its lock timeout and
    quota_db_connections_lost_total, each once, while every call is answered."""
    server, name = await _private_sidecar(
        server_url, coalesce_stall_ms=50, batch_lock_timeout_ms=150
    )
    pool = server.database.pool
    stalled, lost = "quota_batch_stalled_total", "quota_db_connections_lost_total"
    locked = ("quota_batch_fallbacks_total", {"reason": "locked"})
    try:
        plan = await f.plan(pool, NOW, "stall", [quota("messages", "overall", 10)])
        stuck = await f.tenant(pool, NOW, "stuck-tenant", plan)
        other = await f.tenant(pool, NOW, "other-tenant", plan)
        async with AsyncQuotaClient(target(server)) as client:
            assert (await client.check_and_consume(stuck, "messages", 1)).allowed
            assert server.registry.get_sample_value(stalled) == 0
            assert server.registry.get_sample_value(lost) == 0
            async with await psycopg.AsyncConnection.connect(
                libpq_url(server.settings.database_url)
            ) as holder:
                await holder.execute(
                    "SELECT 1 FROM usage_counters WHERE tenant_id = %s FOR UPDATE", (stuck,)
                )
                waiting = asyncio.ensure_future(client.check_and_consume(stuck, "messages", 1))
                await asyncio.sleep(0.3)
                beside = await asyncio.wait_for(client.check_and_consume(other, "messages", 1), 5)
                assert beside.allowed and not waiting.done()
                await holder.commit()
            assert (await asyncio.wait_for(waiting, 5)).windows[0].used == 2
            # the held lock stalled a batch (another may have run long on a busy machine)
            assert (server.registry.get_sample_value(stalled) or 0) >= 1
            assert server.registry.get_sample_value(*locked) == 1
            # every backend of the sidecar's database dies (a restart, an idle timeout)
            async with await psycopg.AsyncConnection.connect(
                libpq_url(server_url), autocommit=True
            ) as admin:
                cur = await admin.execute(
                    "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = %s",
                    (name,),
                )
                pids = [pid for pid, _ in await cur.fetchall()]
                for _ in range(100):  # until they are gone, so the next call meets a dead one
                    cur = await admin.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,)
                    )
                    if (await cur.fetchone()) == (0,):
                        break
                    await asyncio.sleep(0.02)
            assert (await client.check_and_consume(other, "messages", 1)).windows[0].used == 2
            assert server.registry.get_sample_value(lost) == 1
    finally:
        await server.stop(grace=1)
        drop_database(server_url, name)
