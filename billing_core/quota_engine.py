"""The quota use cases: CheckAndConsume, Reserve, Commit, Release, Free, GetUsage.

Each use case is one transaction on one connection: validate → claim the request_id →
load the tenant's plan → lock rows in the global order (see db/quota_store.py) → decide
with the pure rules of limits.py → write counters, record, ledger and key together.
A denial, dry run or error rolls everything back, so nothing is written for them.
The coalescing sidecar decides CheckAndConsume, Reserve, Commit and Release many at a time
(run_batch, with quota_batch.py), exactly as these one-by-one use cases would.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from functools import partial
from typing import Any, TypeVar

import psycopg
import structlog
from psycopg import errors as pg_errors
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from billing_core import decisions
from billing_core.clock import Clock
from billing_core.db import quota_store as store
from billing_core.db.batch_store import CLAIM_RACE_SQLSTATE
from billing_core.db.quota_store import Conn, CounterKey, TenantContext, UsageRecordRow
from billing_core.db.txn import pipelined_transaction
from billing_core.db.wire import BEGIN, COMMIT, FORGOTTEN, Statement, Wire
from billing_core.decisions import (
    add_delta,
    consume_record,
    window_counts,
    window_views,
)
from billing_core.errors import Conflict, InvalidRequest, NotFound, QuotaError, Unavailable
from billing_core.ids import new_id
from billing_core.limits import (
    Quota,
    Reason,
    SubscriptionStatus,
    Verdict,
    access_reason,
    decide,
)
from billing_core.periods import EPOCH, Window, tenant_zone, window_for
from billing_core.pricing import TokenUsage, cost_micros
from billing_core.quota_batch import Request, Result, ShapeMemo, decide_batch
from billing_core.resources import Period
from billing_core.usage import (
    CommitRequest,
    CommitResult,
    ConsumeRequest,
    Decision,
    FreeRequest,
    FreeResult,
    ReleaseRequest,
    ReserveRequest,
    ResourceWindows,
    UsageReport,
    UsageRequest,
)

log = structlog.get_logger(__name__)
T = TypeVar("T")
_RETRYABLE = (pg_errors.SerializationFailure, pg_errors.DeadlockDetected)
_MAX_FORGOTTEN = 100  # more connections than any pool has
_MAX_LOST = 2  # connections found dead in a row before the call answers UNAVAILABLE
# a connection that died under the call (its backend was terminated or crashed, an idle
# timeout closed it, its socket broke): another one may well work
_LOST_SQLSTATES = frozenset(("57P01", "57P02", "57P05"))
# why a batch's requests were all retried one by one: a request_id another transaction
# took meanwhile (expected), a row lock held elsewhere for longer than the batch's
# lock_timeout, the database refused the set-based statements, a bug
FALLBACK_REASONS = ("race", "locked", "refused", "failed")
# a batch's requests decided one by one: this many tenants at once, each in its own order
_ALONE_AT_ONCE = 4
_NO_LIMIT = 1 << 62
# Every row a use case touches is reached through an index, by plans made once per
# connection: generic plans (left to choose, PostgreSQL re-planned the batch's read statement
# for every batch, as much CPU as all the rest of a lone request's work) with sequential
# scans ruled out (a generic plan is kept until its tables are analyzed again, and one made
# on a young database, whose tables were a few pages, went on scanning them once they had
# grown: milliseconds per call, more with every request). Local to the transaction, so the
# pool's other users keep PostgreSQL's own choices; it rides in the pipeline with what
# follows, so it costs no round trip. tests/integration/test_batch_plans.py guards both paths.
_INDEXED_PLANS = (
    "SELECT set_config('enable_seqscan', 'off', true),"
    " set_config('plan_cache_mode', 'force_generic_plan', true)"
)
# a batch's transaction also waits at most `lock_timeout` for a row lock held elsewhere
# (an operator's open transaction, a stuck session): then its requests are decided one by
# one, each tenant on its own, and only the locked tenant's wait on (run_batch)
_BATCH_SETTINGS = Statement(_INDEXED_PLANS + ", set_config('lock_timeout', %(lock_timeout)s, true)")


def _connection_lost(exc: BaseException) -> bool:
    """A dead connection, as opposed to a database that cannot be reached (no connection
    within the acquire timeout: retrying would only wait as long again)."""
    if isinstance(exc, PoolTimeout) or not isinstance(exc, psycopg.Error):
        return False
    return exc.sqlstate is None or exc.sqlstate in _LOST_SQLSTATES


@asynccontextmanager
async def _transaction(conn: Conn) -> AsyncIterator[None]:
    """conn.transaction() (a savepoint inside a batch's transaction), with indexed plans."""
    async with conn.transaction():
        await conn.execute(_INDEXED_PLANS)
        yield


@dataclass(frozen=True, slots=True)
class QuotaRules:
    idempotency_ttl: timedelta = timedelta(hours=24)
    past_due_grace: timedelta = timedelta(days=3)
    # how long a call waits for a database connection before answering UNAVAILABLE
    acquire_timeout_s: float = 2.0
    # how long a batch waits for a row lock before its requests are decided one by one,
    # each tenant on its own (0: as long as it takes)
    batch_lock_timeout_s: float = 1.0


class _Denied(Exception):
    """Raised inside a transaction to roll it back and answer with a denial."""

    def __init__(self, decision: Decision) -> None:
        super().__init__(decision.reason.value)
        self.decision = decision


class _DryRun(Exception):
    def __init__(self, decision: Decision) -> None:
        super().__init__("dry run")
        self.decision = decision


@dataclass(slots=True)
class _Evaluation:
    """What one admission (consume or reserve) found under its locks."""

    ctx: TenantContext
    quotas: tuple[Quota, ...]
    windows: tuple[Window, ...]
    counts: dict[CounterKey, tuple[int, int]]
    expired: list[store.ReservationRow]
    cost: int
    verdict: Verdict
    wallet: tuple[int, int] | None  # (balance, held) when locked


class QuotaEngine:
    """`batch_pool`, when given, serves run_batch alone: a coalescing lane that keeps to
    one PostgreSQL backend finds its statements prepared and that backend's caches warm.
    Cycling through a shared pool of eight (psycopg's pool hands out connections in turn)
    cost a lone batch 1.25 ms of PostgreSQL CPU instead of 0.93 ms, and 0.45 ms of latency
    (measured in-process on the 2-core development machine)."""

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        clock: Clock,
        rules: QuotaRules,
        *,
        batch_pool: AsyncConnectionPool[Any] | None = None,
    ) -> None:
        self._pool = pool
        self._batch_pool = batch_pool or pool
        self._clock = clock
        self._rules = rules
        # the batches' settings parameters, derived once (PostgreSQL takes milliseconds)
        self._batch_settings = {"lock_timeout": str(round(rules.batch_lock_timeout_s * 1000))}
        self._shapes = ShapeMemo()
        # tenants whose calls a batch left to the one-by-one path for lazily expiring state;
        # `untidy_found` is set while there are any (the sidecar's sweep waits on it)
        self._untidy: set[str] = set()
        self.untidy_found = asyncio.Event()
        # for metrics and tests: requests of batches decided one by one in their batch's
        # transaction, and batches whose requests were all retried one by one, by reason
        self.decided_alone = 0
        self.fallbacks = dict.fromkeys(FALLBACK_REASONS, 0)
        self.connections_lost = 0  # calls and batches run again after their connection died

    # --- plumbing ------------------------------------------------------------------

    async def _run(self, work: Callable[[Conn], Awaitable[T]]) -> T:
        """Run a use case on a pooled connection (in pipeline mode: writes that nothing
        waits for share round trips); retry on deadlock/serialization."""

        async def attempt() -> T:
            async with (
                self._pool.connection(timeout=self._rules.acquire_timeout_s) as conn,
                conn.pipeline(),
            ):
                return await work(conn)

        return await self._retrying(attempt)

    async def _retrying(self, attempt: Callable[[], Awaitable[T]]) -> T:
        aborted = forgotten = lost = 0
        while True:
            try:
                return await attempt()
            except FORGOTTEN:  # once per connection after psycopg deallocated (db/wire.py)
                forgotten += 1
                if forgotten > _MAX_FORGOTTEN:
                    raise Unavailable("the database kept forgetting prepared statements") from None
            except _RETRYABLE:
                aborted += 1
                if aborted == 5:
                    raise Unavailable("the database kept aborting the transaction") from None
                await asyncio.sleep(0.001 * 2 ** (aborted - 1))
            except pg_errors.LockNotAvailable:
                raise  # a batch's lock_timeout: run_batch decides its requests one by one
            except (psycopg.OperationalError, TimeoutError) as exc:
                lost += 1
                if lost > _MAX_LOST or not _connection_lost(exc):
                    raise Unavailable(f"database unavailable: {type(exc).__name__}") from None
                # the pool replaces the connection; the attempt runs again on another one.
                # Safe even when the COMMIT had gone out: every request it decided has a
                # request_id (or reservation) that replays its answer instead of counting
                self.connections_lost += 1
                log.warning("connection_lost_retrying", error=str(exc)[:200])

    # --- CheckAndConsume / Reserve -------------------------------------------------

    async def consume(self, req: ConsumeRequest) -> Decision:
        req.validate()
        return await self._run(lambda conn: self._admit(conn, req))

    async def run_batch(
        self,
        reqs: Sequence[Request],
        *,
        overflow: bool = False,
        answer: Callable[[int, Result], None] | None = None,
    ) -> list[Result]:
        """Decide many CheckAndConsume, Reserve (ReserveRequest), Commit and Release requests
        in one transaction, in the given order, exactly as one-by-one calls would: set-based
        (quota_batch.decide_batch), with tenants that have lazily expiring state decided
        one by one in savepoints; one commit for all. When the batch as a whole fails (a
        row lock held elsewhere past `batch_lock_timeout_s`, a request_id taken meanwhile,
        a refused statement, a bug), its requests are decided one by one, each tenant's in
        order and tenants side by side: one bad request never fails its neighbours, and one
        locked tenant holds up only itself.
        `overflow`: on a connection of the shared pool, not the batch pool (a batch that
        runs beside a stalled one, whose connection is taken). `answer(i, result)`, when
        given, is told each result as soon as it is final when the requests are decided one
        by one (before the batch returns), so a caller can answer them as they come."""
        results: dict[int, Result] = {}
        valid: list[int] = []
        for i, req in enumerate(reqs):
            try:
                req.validate()
                valid.append(i)
            except QuotaError as exc:
                results[i] = exc
        if not valid:
            return [results[i] for i in range(len(reqs))]

        async def attempt() -> tuple[dict[int, Result], int, set[str]]:
            batch = [reqs[i] for i in valid]
            timeout = self._rules.acquire_timeout_s
            pool = self._pool if overflow else self._batch_pool
            async with pool.connection(timeout=timeout) as conn:
                async with Wire.open(conn) as wire:  # two round trips for a whole batch
                    wire.send(BEGIN)
                    wire.send(_BATCH_SETTINGS, self._batch_settings)
                    outcome = await decide_batch(
                        wire,
                        batch,
                        self._clock.now(),
                        memo=self._shapes,
                        idempotency_ttl=self._rules.idempotency_ttl,
                        past_due_grace=self._rules.past_due_grace,
                    )
                    if not outcome.one_by_one:
                        wire.send(COMMIT)  # with the writes: one round trip
                    await wire.sync()
                    await outcome.finish()
                done = {valid[j]: result for j, result in outcome.results.items()}
                if outcome.one_by_one:  # in the same transaction, in savepoints
                    async with (
                        conn.pipeline() as pipe,
                        pipelined_transaction(conn, pipe, begun=True),
                    ):
                        for j in outcome.one_by_one:
                            try:
                                done[valid[j]] = await self._decide(conn, batch[j])
                            except (InvalidRequest, NotFound, Conflict) as exc:
                                done[valid[j]] = exc  # its savepoint rolled back
            return done, len(outcome.one_by_one), outcome.untidy

        try:
            done, alone, untidy = await self._retrying(attempt)
            results.update(done)
            self.decided_alone += alone
            if untidy:  # for the sidecar's sweep to clear at once
                self._untidy |= untidy
                self.untidy_found.set()
        except Unavailable as exc:
            results.update({i: exc for i in valid})  # one by one would not fare better
        except Exception as exc:  # decide one by one: one bad request never fails the rest
            self.fallbacks[self._fallback_reason(exc, len(valid))] += 1
            await self._each_alone(reqs, valid, results, answer)
        return [results[i] for i in range(len(reqs))]

    def _fallback_reason(self, exc: Exception, requests: int) -> str:
        """Why a batch failed as a whole (FALLBACK_REASONS), logged as it deserves."""
        if not isinstance(exc, psycopg.Error):
            log.exception("batch_failed", requests=requests)
            return "failed"
        if exc.sqlstate == CLAIM_RACE_SQLSTATE:
            return "race"  # expected: another transaction took one of its request_ids
        if isinstance(exc, pg_errors.LockNotAvailable):
            log.warning("batch_lock_timeout", requests=requests)
            return "locked"
        log.warning("batch_refused", requests=requests, error=str(exc)[:500])
        return "refused"  # the set-based path has a problem worth seeing

    async def _each_alone(
        self,
        reqs: Sequence[Request],
        valid: Sequence[int],
        results: dict[int, Result],
        answer: Callable[[int, Result], None] | None,
    ) -> None:
        """Decide the `valid` requests one by one into `results` (which holds the invalid
        ones' errors already): each tenant's in their order, up to _ALONE_AT_ONCE tenants
        side by side (tenants share no counters, wallets or request_ids, so the order
        between them changes no decision). A tenant whose rows are locked elsewhere waits
        alone for them."""
        if answer is not None:
            for i, invalid in results.items():
                answer(i, invalid)
        by_tenant: dict[str, list[int]] = {}
        for i in valid:
            by_tenant.setdefault(reqs[i].tenant_id, []).append(i)
        gate = asyncio.Semaphore(_ALONE_AT_ONCE)

        async def decide(indices: list[int]) -> None:
            async with gate:
                for i in indices:
                    results[i] = await self._alone(reqs[i])
                    if answer is not None:
                        answer(i, results[i])

        await asyncio.gather(*(decide(indices) for indices in by_tenant.values()))

    async def _alone(self, req: Request) -> Result:
        """One request of a failed batch on its own: whatever goes wrong fails it alone."""
        try:
            return await self.one(req)
        except QuotaError as err:
            return err
        except psycopg.Error as err:  # this request alone: its neighbours stand
            log.error("request_failed", tenant_id=req.tenant_id, error=str(err))
            return Unavailable(f"the database refused the request: {err}")
        except Exception as err:  # a bug: this request fails (INTERNAL), loudly, alone
            log.exception("request_failed", tenant_id=req.tenant_id)
            return QuotaError(f"internal error ({type(err).__name__}), logged")

    async def reserve(self, req: ReserveRequest) -> Decision:
        req.validate()
        return await self._run(lambda conn: self._admit(conn, req))

    def admit(self, req: ConsumeRequest) -> Awaitable[Decision]:
        """consume, or reserve for a ReserveRequest."""
        return self.reserve(req) if isinstance(req, ReserveRequest) else self.consume(req)

    def one(self, req: Request) -> Awaitable[Decision | CommitResult | bool]:
        """A request of a batch on its own: admit, commit or release."""
        if isinstance(req, CommitRequest):
            return self.commit(req)
        if isinstance(req, ReleaseRequest):
            return self.release(req)
        return self.admit(req)

    def _decide(self, conn: Conn, req: Request) -> Awaitable[Decision | CommitResult | bool]:
        if isinstance(req, CommitRequest):
            return self._commit(conn, req)
        if isinstance(req, ReleaseRequest):
            return self._release(conn, req.tenant_id, req.reservation_id, "released")
        return self._admit(conn, req)

    async def _admit(self, conn: Conn, req: ConsumeRequest) -> Decision:
        now = self._clock.now()
        operation, ttl = req.OPERATION, req.hold_seconds
        fingerprint = req.admission_fingerprint()
        try:
            async with _transaction(conn):
                if not req.dry_run:
                    replay = await self._claim(
                        conn, req.tenant_id, req.request_id, operation, fingerprint, now
                    )
                    if replay is not None:
                        return Decision.from_json(replay, replayed=True)
                ev = await self._evaluate(conn, req, now)
                if not ev.verdict.allowed:
                    raise _Denied(self._denial(ev, req, now))
                if req.dry_run:
                    raise _DryRun(self._answer(ev, req))
                decision = await self._apply(conn, ev, req, now, ttl)
                await store.store_response(conn, req.tenant_id, req.request_id, decision.to_json())
                return decision
        except _DryRun as dry:
            return dry.decision
        except _Denied as denied:
            upgrade = await self._upgrade_plan(conn, denied.decision, req)
            return replace(denied.decision, upgrade_plan_id=upgrade)

    async def _claim(
        self,
        conn: Conn,
        tenant_id: str,
        request_id: str,
        operation: str,
        fingerprint: str,
        now: datetime,
    ) -> dict[str, Any] | None:
        """Take the request_id, or return the stored response of its first success."""
        claimed = await store.claim_request_id(
            conn,
            tenant_id,
            request_id,
            operation,
            fingerprint,
            now,
            now + self._rules.idempotency_ttl,
        )
        if claimed:
            return None
        stored_op, stored_hash, response = await store.read_request_id(conn, tenant_id, request_id)
        if stored_hash != fingerprint:
            raise decisions.reused_request_id(request_id, stored_op)
        return response

    async def _evaluate(self, conn: Conn, req: ConsumeRequest, now: datetime) -> _Evaluation:
        lock = not req.dry_run
        ctx = await store.load_context(conn, req.tenant_id, req.resource, now)
        quotas = ctx.quotas.get(req.resource, ())
        cost = await self._cost(conn, req.tokens, now)
        zone = tenant_zone(ctx.timezone)
        windows = tuple(window_for(q.period, now, zone, ctx.anchor) for q in quotas)
        keys = [(req.resource, w.period, w.start) for w in windows]
        gated = decisions.gate(ctx, quotas, now, self._rules.past_due_grace)
        if gated is not None:
            counts = await store.read_counters(conn, req.tenant_id, keys)
            return _Evaluation(ctx, quotas, windows, counts, [], cost, gated, None)
        expired = (
            await store.expired_reservations(conn, req.tenant_id, req.resource, now, lock=lock)
            if ctx.has_expired_reservations
            else []
        )
        all_keys = keys + [k for r in expired for k in r.windows]
        if lock:
            counts = await store.lock_counters(conn, req.tenant_id, all_keys)
        else:
            counts = await store.read_counters(conn, req.tenant_id, all_keys)
        for r in expired:  # expired reservations stop counting (released lazily, here)
            for k in r.windows:
                used, reserved = counts[k]
                counts[k] = (used, reserved - r.amount)
        wcs = window_counts(quotas, windows, counts, req.resource)
        verdict = decide(wcs, req.amount, cost, _NO_LIMIT, unlimited=ctx.unlimited)
        wallet: tuple[int, int] | None = None
        needs_wallet = verdict.charge_micros > 0 or any(r.held_micros for r in expired)
        if verdict.allowed and needs_wallet:
            if lock:
                wallet = await store.lock_wallet(
                    conn, req.tenant_id, now, expire_due=ctx.has_due_grants
                )
                balance, held = wallet
            else:
                balance, held = ctx.wallet_live_micros, 0
            held -= sum(r.held_micros for r in expired)
            verdict = decide(wcs, req.amount, cost, balance - held, unlimited=ctx.unlimited)
        return _Evaluation(ctx, quotas, windows, counts, expired, cost, verdict, wallet)

    async def _cost(self, conn: Conn, tokens: TokenUsage | None, now: datetime) -> int:
        if tokens is None:
            return 0
        price = await store.price_at(conn, tokens.provider, tokens.model, now)
        return cost_micros(tokens, price)

    async def _apply(
        self, conn: Conn, ev: _Evaluation, req: ConsumeRequest, now: datetime, ttl: int | None
    ) -> Decision:
        tenant = req.tenant_id
        deltas: dict[CounterKey, tuple[int, int]] = {}
        for r in ev.expired:
            for k in r.windows:
                add_delta(deltas, k, 0, -r.amount)
        if ev.expired:
            await store.finish_reservations(
                conn, tenant, [r.reservation_id for r in ev.expired], "expired", now
            )
        for w in ev.windows:
            key = (req.resource, w.period, w.start)
            add_delta(deltas, key, 0, req.amount) if ttl is not None else add_delta(
                deltas, key, req.amount, 0
            )
        # counts were adjusted for expiry already; the DB rows were not
        await store.add_to_counters(conn, tenant, deltas)
        charge = ev.verdict.charge_micros
        balance = ev.ctx.wallet_live_micros
        hold_delta = (charge if ttl is not None else 0) - sum(r.held_micros for r in ev.expired)
        record_id = ""
        reservation_id = ""
        expires_at = None
        if ttl is None:
            record_id = new_id("ur", now)
            await store.insert_usage_record(
                conn,
                tenant,
                consume_record(req, record_id, ev.ctx.plan_id, ev.cost, charge, now),
            )
        else:
            reservation_id = new_id("rsv", now)
            expires_at = now + timedelta(seconds=ttl)
            await store.insert_reservation(
                conn,
                tenant,
                reservation_id,
                req.request_id,
                req.resource,
                req.amount,
                [(req.resource, w.period, w.start) for w in ev.windows],
                charge,
                req.labels,
                now,
                expires_at,
            )
        if ev.wallet is not None:
            balance = await store.change_wallet(
                conn,
                tenant,
                *ev.wallet,
                debit_micros=0 if ttl is not None else charge,
                hold_delta_micros=hold_delta,
                usage_record_id=record_id or None,
                now=now,
            )
        await self._notify(conn, ev, req.resource, req.amount, now)
        answer = self._answer(ev, req)
        return replace(
            answer,
            wallet_balance_micros=balance,
            usage_record_id=record_id,
            reservation_id=reservation_id,
            expires_at=expires_at,
        )

    def _answer(self, ev: _Evaluation, req: ConsumeRequest) -> Decision:
        return decisions.allowed(ev.ctx, ev.quotas, ev.windows, ev.counts, req, ev.cost)

    def _denial(self, ev: _Evaluation, req: ConsumeRequest, now: datetime) -> Decision:
        return decisions.denial(
            ev.ctx, ev.quotas, ev.windows, ev.counts, req, ev.cost, ev.verdict, now
        )

    async def _upgrade_plan(self, conn: Conn, denial: Decision, req: ConsumeRequest) -> str:
        """The cheapest active self-serve plan that would have allowed the request."""
        if denial.reason is Reason.PAYMENT_PAST_DUE:
            return ""
        offers = await store.plan_offers(conn, req.resource, denial.upgrade_plan_id or None)
        return decisions.choose_upgrade(denial, req.amount, offers)

    async def _notify(
        self, conn: Conn, ev: _Evaluation, resource: str, amount: int, now: datetime
    ) -> None:
        rows = decisions.thresholds(ev.quotas, ev.windows, ev.counts, resource, amount)
        if rows:
            await store.insert_notifications(conn, ev.ctx.tenant_id, rows, now)

    # --- Commit / Release ------------------------------------------------------------

    async def commit(self, req: CommitRequest) -> CommitResult:
        req.validate()
        return await self._run(lambda conn: self._commit(conn, req))

    async def _commit(self, conn: Conn, req: CommitRequest) -> CommitResult:
        now = self._clock.now()
        fingerprint = req.fingerprint()
        async with _transaction(conn):
            res = await store.lock_reservation(conn, req.tenant_id, req.reservation_id)
            settled = decisions.settled_commit(res, fingerprint)
            if settled is not None:
                return settled
            ctx = await store.load_context(conn, req.tenant_id, res.resource, now)
            quotas = ctx.quotas.get(res.resource, ())
            cost = await self._cost(conn, req.tokens, now)
            zone = tenant_zone(ctx.timezone)
            windows = tuple(window_for(q.period, now, zone, ctx.anchor) for q in quotas)
            keys = [(res.resource, w.period, w.start) for w in windows]
            live = res.status == "active"  # its amount is still in the counters
            counts = await store.lock_counters(
                conn, req.tenant_id, keys + (list(res.windows) if live else [])
            )
            deltas: dict[CounterKey, tuple[int, int]] = {}
            if live:
                for k in res.windows:
                    add_delta(deltas, k, 0, -res.amount)
                    used, reserved = counts[k]
                    counts[k] = (used, reserved - res.amount)
            wcs = window_counts(quotas, windows, counts, res.resource)
            charge, over_limit = decisions.commit_charge(wcs, req.amount, cost, ctx.unlimited)
            held_back = res.held_micros if live else 0
            balance = ctx.wallet_live_micros
            paid = 0
            record_id = new_id("ur", now)
            if charge or held_back:
                wallet_balance, held = await store.lock_wallet(conn, req.tenant_id, now)
                # holds can outlast the credits behind them: never a negative payment
                paid = max(0, min(charge, wallet_balance - (held - held_back)))
                balance = await store.change_wallet(
                    conn,
                    req.tenant_id,
                    wallet_balance,
                    held,
                    debit_micros=paid,
                    hold_delta_micros=-held_back,
                    usage_record_id=record_id,
                    now=now,
                )
            for k in keys:
                add_delta(deltas, k, req.amount, 0)
            await store.add_to_counters(conn, req.tenant_id, deltas)
            over = over_limit or paid < charge
            record = decisions.commit_record(
                req, res, record_id, ctx.plan_id, cost, paid, over, now
            )
            await store.insert_usage_record(conn, req.tenant_id, record)
            ev = _Evaluation(
                ctx, quotas, windows, counts, [], cost, Verdict(True, Reason.ALLOWED), None
            )
            await self._notify(conn, ev, res.resource, req.amount, now)
            result = CommitResult(
                usage_record_id=record_id,
                cost_micros=cost,
                windows=window_views(
                    quotas, windows, counts, res.resource, req.amount, ctx.unlimited
                ),
                wallet_balance_micros=balance,
            )
            await store.finish_reservations(
                conn,
                req.tenant_id,
                [res.reservation_id],
                "committed",
                now,
                record_id,
                {**result.to_json(), "fingerprint": fingerprint},
            )
            return result

    async def release(self, req: ReleaseRequest) -> bool:
        req.validate()
        return await self._run(
            lambda conn: self._release(conn, req.tenant_id, req.reservation_id, "released")
        )

    async def _release(self, conn: Conn, tenant_id: str, reservation_id: str, status: str) -> bool:
        now = self._clock.now()
        async with _transaction(conn):
            res = await store.lock_reservation(conn, tenant_id, reservation_id)
            if res.status != "active" or (status == "expired" and res.expires_at > now):
                return False
            await store.lock_counters(conn, tenant_id, res.windows)
            await store.add_to_counters(conn, tenant_id, {k: (0, -res.amount) for k in res.windows})
            if res.held_micros:
                balance, held = await store.lock_wallet(conn, tenant_id, now)
                await store.change_wallet(
                    conn, tenant_id, balance, held, hold_delta_micros=-res.held_micros, now=now
                )
            await store.finish_reservations(conn, tenant_id, [reservation_id], status, now)
            return True

    async def sweep_expired(self, limit: int = 500, tenant_ids: Sequence[str] | None = None) -> int:
        """Release reservations past their expiry (the periodic half of lazy expiry), of
        `tenant_ids` only when given."""
        now = self._clock.now()
        due = await self._run(
            lambda conn: store.expired_reservation_ids(conn, now, limit, tenant_ids)
        )
        swept = 0
        for tenant_id, reservation_id in due:
            work = partial(
                self._release, tenant_id=tenant_id, reservation_id=reservation_id, status="expired"
            )
            if await self._run(work):
                swept += 1
        return swept

    async def sweep_due_grants(
        self, limit: int = 500, tenant_ids: Sequence[str] | None = None
    ) -> int:
        """Mark grants past their expiry as expired, their remainder leaving the balance with
        a ledger entry (what locking the wallet does lazily, for tenants whose calls never
        reach their wallet); of `tenant_ids` only when given. Returns how many expired."""
        now = self._clock.now()
        due = await self._run(lambda conn: store.due_grant_tenants(conn, now, limit, tenant_ids))
        expired = 0
        for tenant_id in due:

            async def expire(conn: Conn, tenant_id: str = tenant_id) -> int:
                async with _transaction(conn):
                    return await store.expire_due_grants(conn, tenant_id, now)

            expired += await self._run(expire)
        return expired

    def take_untidy(self) -> list[str]:
        """The tenants batches found with lazily expiring state since the last call."""
        untidy, self._untidy = sorted(self._untidy), set()
        self.untidy_found.clear()
        return untidy

    async def tidy(self, tenant_ids: Sequence[str]) -> tuple[int, int]:
        """Release the tenants' expired reservations and expire their due grants now, so
        that batches decide their calls set-based again (until then each goes one by one).
        Returns (reservations released, grants expired)."""
        if not tenant_ids:
            return 0, 0
        released = await self.sweep_expired(limit=10_000, tenant_ids=tenant_ids)
        return released, await self.sweep_due_grants(limit=10_000, tenant_ids=tenant_ids)

    async def sweep_expired_keys(self, limit: int = 5_000, rounds: int = 20) -> int:
        """Delete idempotency keys past their expiry (IDEMPOTENCY_TTL_HOURS), `limit` per
        transaction so no lock is held long, at most `rounds` transactions per sweep (the
        next sweep goes on); without it the table, which CheckAndConsume reads and writes
        on every call, would grow by one row per request forever."""
        now = self._clock.now()

        async def delete(conn: Conn) -> int:
            async with _transaction(conn):
                return await store.delete_expired_request_ids(conn, now, limit)

        swept = 0
        for _ in range(rounds):
            deleted = await self._run(delete)
            swept += deleted
            if deleted < limit:
                break
        return swept

    # --- Free ------------------------------------------------------------------------

    async def free(self, req: FreeRequest) -> FreeResult:
        req.validate()
        return await self._run(lambda conn: self._free(conn, req))

    async def _free(self, conn: Conn, req: FreeRequest) -> FreeResult:
        now = self._clock.now()
        async with _transaction(conn):
            replay = await self._claim(
                conn, req.tenant_id, req.request_id, "free", req.fingerprint(), now
            )
            if replay is not None:
                return FreeResult.from_json(replay, replayed=True)
            ctx = await store.load_context(conn, req.tenant_id, req.resource, now)
            quotas = ctx.quotas.get(req.resource, ())
            if not any(q.period is Period.CUMULATIVE for q in quotas):
                raise InvalidRequest(
                    f"{req.resource} has no cumulative quota in the current plan; Free only "
                    "lowers cumulative resources (agents, bots, boards, files, storage …)"
                )
            zone = tenant_zone(ctx.timezone)
            windows = tuple(window_for(q.period, now, zone, ctx.anchor) for q in quotas)
            counts = await store.lock_counters(
                conn, req.tenant_id, [(req.resource, w.period, w.start) for w in windows]
            )
            level_key = (req.resource, Period.CUMULATIVE, EPOCH)
            in_use = counts[level_key][0]
            if req.amount > in_use:
                raise InvalidRequest(
                    f"cannot free {req.amount:,} {req.resource}: only {in_use:,} in use"
                )
            await store.add_to_counters(conn, req.tenant_id, {level_key: (-req.amount, 0)})
            used, reserved = counts[level_key]
            counts[level_key] = (used - req.amount, reserved)
            await store.insert_usage_record(
                conn,
                req.tenant_id,
                UsageRecordRow(
                    new_id("ur", now),
                    req.resource,
                    -req.amount,
                    "free",
                    req.request_id,
                    None,
                    ctx.plan_id,
                    None,
                    None,
                    0,
                    0,
                    0,
                    0,
                    False,
                    {},
                    now,
                ),
            )
            result = FreeResult(
                window_views(quotas, windows, counts, req.resource, 0, ctx.unlimited)
            )
            await store.store_response(conn, req.tenant_id, req.request_id, result.to_json())
            return result

    # --- GetUsage --------------------------------------------------------------------

    async def usage(self, req: UsageRequest) -> UsageReport:
        req.validate()
        return await self._run(lambda conn: self._usage(conn, req))

    async def _usage(self, conn: Conn, req: UsageRequest) -> UsageReport:
        now = self._clock.now()
        async with _transaction(conn):
            ctx = await store.load_context(conn, req.tenant_id, req.resource, now)
            zone = tenant_zone(ctx.timezone)
            keys: list[CounterKey] = []
            per_resource: dict[str, tuple[tuple[Quota, ...], tuple[Window, ...]]] = {}
            for resource in sorted(ctx.quotas):
                quotas = ctx.quotas[resource]
                windows = tuple(window_for(q.period, now, zone, ctx.anchor) for q in quotas)
                per_resource[resource] = (quotas, windows)
                keys += [(resource, w.period, w.start) for w in windows]
            counts = await store.read_counters(conn, req.tenant_id, keys)
            for r in await store.expired_reservations(
                conn, req.tenant_id, req.resource, now, lock=False
            ):
                for k in r.windows:
                    if k in counts:
                        used, reserved = counts[k]
                        counts[k] = (used, reserved - r.amount)
        reason = access_reason(ctx.access, now, self._rules.past_due_grace)
        status = ctx.access.status
        if status is SubscriptionStatus.TRIALING and reason is Reason.TRIAL_EXPIRED:
            status = SubscriptionStatus.TRIAL_EXPIRED
        return UsageReport(
            plan_id=ctx.plan_id or "",
            subscription_status=status.value if status else "none",
            trial_ends_at=ctx.trial_end,
            resources=tuple(
                ResourceWindows(res, window_views(q, w, counts, res, 0, ctx.unlimited))
                for res, (q, w) in per_resource.items()
            ),
            wallet_balance_micros=ctx.wallet_live_micros,
        )
