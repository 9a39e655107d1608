"""The background sweeps: lapsed state of tenants no call reaches, and request_ids past
their expiry. Several sidecars may sweep at once; they skip each other's rows."""

from __future__ import annotations

from collections.abc import Sequence

import structlog

from billing_core.clock import Clock
from billing_core.quota.answers import Tidied
from billing_core.quota.engine import QuotaEngine
from billing_core.quota.ports import QuotaStore
from billing_core.quota.requests import TidyRequest

log = structlog.get_logger(__name__)
TENANTS_PER_TRANSACTION = 50


class Sweeper:
    def __init__(self, engine: QuotaEngine, store: QuotaStore, clock: Clock) -> None:
        self._engine = engine
        self._store = store
        self._clock = clock

    async def lapsed(self, limit: int = 500, tenant_ids: Sequence[str] | None = None) -> Tidied:
        """Release reservations past their expiry and expire grants past theirs, for up to
        `limit` tenants (of `tenant_ids` only, when given): what every transaction does on
        the way for the tenants it writes for (core.tidy), for tenants no call reaches."""
        due = await self._store.lapsed_tenants(self._clock.now(), limit, tenant_ids)
        swept = Tidied()
        for start in range(0, len(due), TENANTS_PER_TRANSACTION):
            chunk = due[start : start + TENANTS_PER_TRANSACTION]
            for result in await self._engine.run_batch(
                [TidyRequest(t) for t in chunk], shared=True
            ):
                if isinstance(result, Tidied):
                    swept += result
                else:
                    log.warning("sweep_skipped_tenant", error=str(result))
        return swept

    async def idempotency_keys(self, limit: int = 5_000, rounds: int = 20) -> int:
        """Delete request_ids past their expiry (IDEMPOTENCY_TTL_HOURS), `limit` per
        transaction so no lock is held long, at most `rounds` transactions per sweep (the
        next sweep goes on). An expired request_id counts as new everywhere already, so
        forgetting it changes no answer; without this the table every CheckAndConsume
        writes would grow by a row per request forever."""
        swept = 0
        for _ in range(rounds):
            deleted = await self._store.delete_expired_keys(self._clock.now(), limit)
            swept += deleted
            if deleted < limit:
                break
        return swept
