"""QuotaEngine: the quota use cases — CheckAndConsume, several of them all-or-nothing,
Reserve, Commit, Release, Free, ReportUsage, GetUsage — each answered by one transaction
through the decision core, alone or with the other requests of a coalesced batch
(run_batch)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TypeVar

import structlog

from billing_core.clock import Clock
from billing_core.errors import QuotaError, Unavailable
from billing_core.quota.answers import (
    CommitResult,
    Decision,
    FreeResult,
    GroupDecision,
    ReportResult,
    Result,
    UsageReport,
)
from billing_core.quota.batch import ShapeMemo, decide_batch
from billing_core.quota.core import Rules
from billing_core.quota.ports import BatchAborted, Pending, QuotaSession, QuotaStore
from billing_core.quota.reports import report_usage
from billing_core.quota.requests import (
    AdmitAllRequest,
    CommitRequest,
    ConsumeRequest,
    FreeRequest,
    ReleaseRequest,
    ReportRequest,
    Request,
    ReserveRequest,
    UsageRequest,
)

log = structlog.get_logger(__name__)
T = TypeVar("T")
# why a batch's requests were decided again one per transaction (BatchAborted's reasons, and
# `failed`: a bug)
FALLBACK_REASONS = ("race", "locked", "refused", "failed")
# tenants decided side by side when a batch falls back: bounds what a fallback takes from
# the shared pool, which lone calls, reports and the sweep also use
FALLBACK_TENANTS_AT_ONCE = 4
# a lone request whose request_id another transaction took meanwhile runs again (and then
# replays the other's answer); a third twin arriving each time is all that can exhaust this
RACE_RETRIES = 5


@dataclass(frozen=True, slots=True)
class QuotaRules:
    idempotency_ttl: timedelta = timedelta(hours=24)
    past_due_grace: timedelta = timedelta(days=3)
    # how long a batch waits for a row lock held elsewhere before its requests are decided
    # one per transaction, so that only the locked tenant's wait on (0: as long as it takes)
    batch_lock_timeout_s: float = 1.0

    def decision_rules(self) -> Rules:
        return Rules(past_due_grace=self.past_due_grace, idempotency_ttl=self.idempotency_ttl)


@dataclass(slots=True)
class EngineStats:
    """Counts for the transports' metrics."""

    fallbacks: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FALLBACK_REASONS, 0))


class QuotaEngine:
    """The quota use cases over a QuotaStore (billing_core/db/quota_store.py). A batch that
    fails as a whole (a request_id another transaction took meanwhile, a row lock held
    elsewhere past its lock timeout, a statement the database refused, a bug) is decided
    again one request per transaction: each tenant's in their order, a few tenants side by
    side, so one bad request never fails its neighbours and one locked tenant holds up
    only itself."""

    def __init__(self, store: QuotaStore, clock: Clock, rules: QuotaRules) -> None:
        self._store = store
        self._clock = clock
        self._rules = rules
        self._decision_rules = rules.decision_rules()
        self._lock_timeout_ms = round(rules.batch_lock_timeout_s * 1000)
        self._memo = ShapeMemo()
        self.stats = EngineStats()

    @property
    def connections_lost(self) -> int:
        """Transactions run again because their connection had died."""
        return self._store.connections_lost

    # --- the use cases, one request each ---------------------------------------------------

    async def consume(self, req: ConsumeRequest) -> Decision:
        """CheckAndConsume (or Reserve, for a ReserveRequest)."""
        return _expect(await self.decide(req), Decision)

    async def admit_all(self, req: AdmitAllRequest) -> GroupDecision:
        """Several CheckAndConsumes of one tenant, all-or-nothing."""
        return _expect(await self.decide(req), GroupDecision)

    async def reserve(self, req: ReserveRequest) -> Decision:
        return _expect(await self.decide(req), Decision)

    async def commit(self, req: CommitRequest) -> CommitResult:
        return _expect(await self.decide(req), CommitResult)

    async def release(self, req: ReleaseRequest) -> bool:
        return _expect(await self.decide(req), bool)

    async def free(self, req: FreeRequest) -> FreeResult:
        return _expect(await self.decide(req), FreeResult)

    async def report(self, req: ReportRequest) -> ReportResult:
        """ReportUsage: fail-open usage counted after the fact."""
        return _expect(await self.decide(req), ReportResult)

    async def decide(self, req: Request) -> Result:
        """One request in a transaction of its own; its error is returned, not raised."""
        try:
            req.validate()
        except QuotaError as exc:
            return exc
        return await self._decide_single(req)

    async def usage(self, req: UsageRequest) -> UsageReport:
        """GetUsage: every window, read without locks."""
        req.validate()

        async def work(session: QuotaSession) -> Pending[UsageReport]:
            return await report_usage(session, req, self._clock.now(), self._decision_rules)

        return await self._store.run(work)

    # --- batches -----------------------------------------------------------------------------

    async def run_batch(
        self,
        reqs: Sequence[Request],
        *,
        shared: bool = False,
        answer: Callable[[int, Result], None] | None = None,
    ) -> list[Result]:
        """Decide the requests in one transaction, in the given order, as the same requests
        one per transaction would be decided. `shared`: on the shared pool rather than the
        batches' own connections (a batch beside a stalled one, the sweep). `answer(i,
        result)`, when given, hears each result as soon as it is final when the batch falls
        back to one request per transaction (before the batch returns)."""
        results: dict[int, Result] = {}
        valid: list[int] = []
        for i, req in enumerate(reqs):
            try:
                req.validate()
                valid.append(i)
            except QuotaError as exc:
                results[i] = exc
        if valid:
            batch = [reqs[i] for i in valid]
            try:
                decided = await self._transaction(
                    batch, lock_timeout_ms=self._lock_timeout_ms, shared=shared
                )
                results.update(zip(valid, decided, strict=True))
            except Unavailable as exc:
                results.update({i: exc for i in valid})  # one at a time would not fare better
            except Exception as exc:
                self.stats.fallbacks[_fallback_reason(exc, len(valid))] += 1
                await self._decide_one_at_a_time(reqs, valid, results, answer)
        return [results[i] for i in range(len(reqs))]

    async def _transaction(
        self, reqs: Sequence[Request], *, lock_timeout_ms: int, shared: bool
    ) -> list[Result]:
        async def work(session: QuotaSession) -> Pending[list[Result]]:
            return await decide_batch(
                session, reqs, self._clock.now(), memo=self._memo, rules=self._decision_rules
            )

        return await self._store.run(work, lock_timeout_ms=lock_timeout_ms, shared=shared)

    async def _decide_one_at_a_time(
        self,
        reqs: Sequence[Request],
        valid: Sequence[int],
        results: dict[int, Result],
        answer: Callable[[int, Result], None] | None,
    ) -> None:
        """Decide the `valid` requests one per transaction into `results` (which holds the
        invalid ones' errors already): each tenant's in their order, a few tenants side by
        side (tenants share no counters, wallets or request_ids, so the order between them
        changes no decision). A tenant whose rows are locked elsewhere waits alone."""
        if answer is not None:
            for i, invalid in results.items():
                answer(i, invalid)
        by_tenant: dict[str, list[int]] = {}
        for i in valid:
            by_tenant.setdefault(reqs[i].tenant_id, []).append(i)
        gate = asyncio.Semaphore(FALLBACK_TENANTS_AT_ONCE)

        async def decide_tenant(indices: list[int]) -> None:
            async with gate:
                for i in indices:
                    results[i] = await self._decide_single(reqs[i])
                    if answer is not None:
                        answer(i, results[i])

        await asyncio.gather(*(decide_tenant(indices) for indices in by_tenant.values()))

    async def _decide_single(self, req: Request) -> Result:
        """A validated request in a transaction of its own: whatever goes wrong fails it
        alone. A request_id another transaction took meanwhile sends it round again, to
        replay the other's answer."""
        for attempt in range(RACE_RETRIES + 1):
            try:
                [result] = await self._transaction([req], lock_timeout_ms=0, shared=True)
                return result
            except QuotaError as exc:
                return exc
            except BatchAborted as exc:
                if exc.reason == "race" and attempt < RACE_RETRIES:
                    continue
                log.error("request_failed", tenant_id=req.tenant_id, error=str(exc)[:500])
                return Unavailable(f"the database refused the request: {exc.detail or exc}")
            except Exception as exc:  # a bug: this request fails (INTERNAL), loudly, alone
                log.exception("request_failed", tenant_id=req.tenant_id)
                return QuotaError(f"internal error ({type(exc).__name__}), logged")
        raise AssertionError("unreachable")  # pragma: no cover


def _fallback_reason(exc: Exception, requests: int) -> str:
    """Why a batch failed as a whole (FALLBACK_REASONS), logged as it deserves."""
    if not isinstance(exc, BatchAborted):
        log.exception("batch_failed", requests=requests)
        return "failed"
    if exc.reason == "locked":
        log.warning("batch_lock_timeout", requests=requests)
    elif exc.reason == "refused":
        log.warning("batch_refused", requests=requests, error=exc.detail[:500])
    return exc.reason  # race: expected, another transaction took one of its request_ids


def _expect(result: Result, kind: type[T]) -> T:
    """The answer of a lone request, or its error raised."""
    if isinstance(result, QuotaError):
        raise result
    assert isinstance(result, kind), result
    return result
