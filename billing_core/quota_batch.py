"""CheckAndConsume, Reserve, Commit and Release for a batch of requests, decided set-based
in one transaction.

A handful of statements serve the whole batch, whatever its size, in two round trips:

1. one round trip locks the reservations the batch commits or releases, reads the tenants' contexts,
   the model prices and the request_ids that are already taken, and creates-if-missing and
   locks (in the global key order) the counter rows, wallets and grants the batch will
   touch — as predicted from what the tenants looked like last time and from the
   reservations this process made (ShapeMemo). The contexts just read decide what is really
   needed; whatever the prediction missed (a tenant seen for the first time, a changed
   plan) is locked in an extra round trip, so a stale prediction costs time, never
   correctness;
2. the requests are decided in memory, in arrival order, each seeing the ones before it —
   exactly the decisions one-by-one calls would make (tests/integration/test_coalescing.py
   runs random workloads both ways and compares answers and books). A Reserve is decided
   as CheckAndConsume is; it differs in what it writes: its amount goes to the counters'
   `reserved` instead of `used`, a reservation instead of a usage record, and what it may
   cost is held on the wallet (held_micros) instead of debited from its grants. A Commit
   moves its reservation's amount from `reserved` to what was really used, pays from the
   wallet what went over a wallet quota and gives the hold back (_commit_one); a Release
   gives back the amount and the hold (_release_one);
3. one statement writes counters, usage records, reservations and their commits, grant
   debits, ledger entries, wallets, notifications and idempotency keys set-based; the
   caller sends it with the upgrade-offer reads for denials and its COMMIT in one round
   trip (db/wire.py).

Tenants with lazily expiring state (an expired reservation to release, a grant to expire)
are left to the one-by-one path, in the same transaction. When another transaction took
one of the batch's request_ids meanwhile, the write statement fails (SQLSTATE QB001, see
migration 0004), the transaction rolls back and the caller decides the requests one by one,
which waits for and replays the twin.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from billing_core import decisions
from billing_core.db import batch_store as bs
from billing_core.db.batch_store import BatchWrites, StoredKey, TenantKey
from billing_core.db.quota_store import (
    CounterKey,
    PlanOffer,
    ReservationRow,
    TenantContext,
    unknown_reservation,
)
from billing_core.db.wire import Wire
from billing_core.errors import QuotaError
from billing_core.ids import new_id
from billing_core.limits import Quota, Reason, decide
from billing_core.periods import Window, tenant_zone, window_for
from billing_core.pricing import ModelPrice, TokenUsage, cost_micros, missing_price
from billing_core.resources import Overage, Period
from billing_core.usage import (
    CommitRequest,
    CommitResult,
    ConsumeRequest,
    Decision,
    ReleaseRequest,
)
from billing_core.wallet import LiveGrant, allocate_debit

NO_LIMIT = 1 << 62
SETTLED = ("committed", "released")  # a reservation no Commit can change any more


# CheckAndConsume or Reserve (a ReserveRequest), Commit, Release
Request = ConsumeRequest | CommitRequest | ReleaseRequest
Result = Decision | CommitResult | bool | QuotaError
Held = dict[tuple[str, str], ReservationRow]  # (tenant_id, reservation_id): the reservation


@dataclass(slots=True)
class BatchOutcome:
    # answers of the batched requests; denials get their upgrade offer in finish()
    results: dict[int, Result]
    one_by_one: list[int]  # positions left to the one-by-one path
    # tenants left to it for lazily expiring state (an expired reservation, a due grant):
    # once that is cleared (QuotaEngine.tidy), their calls are decided set-based again
    untidy: set[str]
    finish: Callable[[], Awaitable[None]]  # after the writes were sent: fetch what they return


@dataclass(slots=True)
class _Tenant:
    """One tenant's state as the batch goes, request after request."""

    ctx: TenantContext
    counts: dict[CounterKey, tuple[int, int]] = field(default_factory=dict)
    spent: int = 0  # wallet micros this batch has charged since ctx was last brought up to date
    wallet: tuple[int, int] | None = None  # locked (balance, held); None: no wallet row
    grants: list[LiveGrant] = field(default_factory=list)
    taken: dict[str, StoredKey] = field(default_factory=dict)  # live request_ids
    windows: dict[str, tuple[tuple[Quota, ...], tuple[Window, ...]]] = field(default_factory=dict)

    def plan(
        self, resource: str, now: datetime, shared: dict[tuple[Period, str, datetime], Window]
    ) -> tuple[tuple[Quota, ...], tuple[Window, ...]]:
        """The quotas of `resource` and their windows at `now`; `shared` caches windows
        across the batch's tenants (daily/weekly depend on the timezone, monthly on the
        anchor)."""
        found = self.windows.get(resource)
        if found is None:
            quotas = self.ctx.quotas.get(resource, ())
            windows = []
            for q in quotas:
                key = (q.period, self.ctx.timezone, self.ctx.anchor)
                window = shared.get(key)
                if window is None:
                    zone = tenant_zone(self.ctx.timezone)
                    window = shared[key] = window_for(q.period, now, zone, self.ctx.anchor)
                windows.append(window)
            found = self.windows[resource] = (quotas, tuple(windows))
        return found

    def live_micros(self) -> int:
        """The live wallet as the batch has left it so far."""
        return self.ctx.wallet_live_micros - self.spent

    def context(self) -> TenantContext:
        """The context with the live wallet as the batch has left it so far."""
        if self.spent:
            self.ctx = replace(self.ctx, wallet_live_micros=self.live_micros())
            self.spent = 0
        return self.ctx


class ShapeMemo:
    """What each (tenant, resource) looked like in the last batch — its timezone, anchor
    and quotas — so that the next batch can lock its counter rows in the same round trip
    that reads the contexts. Only a guess: every batch re-reads the contexts in its own
    transaction and locks whatever the guess missed, so a changed plan is enforced at once.
    Likewise the reservations this process made, until they are committed: a Commit's
    counter rows and wallet are locked with its reservation.
    Bounded: forgotten wholesale when it outgrows `limit`."""

    def __init__(self, limit: int = 100_000) -> None:
        self._limit = limit
        self._seen: dict[tuple[str, str], TenantContext] = {}
        self._held: Held = {}  # reservations this process made, until committed

    def get(self, tenant_id: str, resource: str) -> TenantContext | None:
        return self._seen.get((tenant_id, resource))

    def remember(self, ctx: TenantContext, resources: Iterable[str]) -> None:
        if len(self._seen) >= self._limit:
            self._seen.clear()
        for resource in resources:
            self._seen[(ctx.tenant_id, resource)] = ctx

    def reservation(self, tenant_id: str, reservation_id: str) -> ReservationRow | None:
        return self._held.get((tenant_id, reservation_id))

    def hold(self, tenant_id: str, res: ReservationRow) -> None:
        if len(self._held) >= self._limit:
            self._held.clear()
        self._held[(tenant_id, res.reservation_id)] = res

    def settle(self, tenant_id: str, reservation_id: str) -> None:
        self._held.pop((tenant_id, reservation_id), None)


async def decide_batch(
    wire: Wire,
    reqs: Sequence[Request],
    now: datetime,
    *,
    memo: ShapeMemo,
    idempotency_ttl: timedelta,
    past_due_grace: timedelta,
) -> BatchOutcome:
    """Decide validated requests in order inside the caller's transaction and queue their
    writes; the caller sends them (with its COMMIT when nothing is left one by one) and
    then calls `outcome.finish()`."""
    admissions = [r for r in reqs if isinstance(r, ConsumeRequest)]
    settling = sorted(
        {(r.tenant_id, r.reservation_id) for r in reqs if not isinstance(r, ConsumeRequest)}
    )
    asked = sorted({r.resource for r in admissions})
    # a Commit's resource is its reservation's, locked in the same round trip: all quotas then
    resources = None if any(isinstance(r, CommitRequest) for r in reqs) else asked
    tenant_ids = sorted({r.tenant_id for r in reqs})
    models = sorted(
        {
            (r.tokens.provider, r.tokens.model)
            for r in reqs
            if not isinstance(r, ReleaseRequest) and r.tokens is not None
        }
    )
    keys = sorted({(r.tenant_id, r.request_id) for r in admissions if not r.dry_run})
    shared: dict[tuple[Period, str, datetime], Window] = {}

    # round trip 1: the reservations to commit or release, contexts, prices and taken
    # request_ids, and the locks the memo predicts
    held_p = bs.send_reservations(wire, settling) if settling else None
    guessed_held: Held = {}
    guess: dict[str, _Tenant] = {}
    for req in reqs:
        if isinstance(req, ConsumeRequest):
            resource = req.resource
        else:
            res = memo.reservation(req.tenant_id, req.reservation_id)
            if res is None:
                continue
            guessed_held[(req.tenant_id, req.reservation_id)] = res
            resource = res.resource
        if req.tenant_id not in guess and (seen := memo.get(req.tenant_id, resource)):
            guess[req.tenant_id] = _Tenant(seen)
    guessed_keys, guessed_wallets = _locks(reqs, guess, guessed_held, now, shared)
    reads_p = bs.send_reads(wire, tenant_ids, resources, models, keys, now)
    locks_p = bs.send_locks(wire, guessed_keys, guessed_wallets) if guess else None
    held = await held_p() if held_p else {}
    reads = await reads_p()
    contexts, prices = reads.contexts, reads.prices
    locked = await locks_p() if locks_p else bs.Locked({}, {}, {})

    tenants: dict[str, _Tenant] = {}
    one_by_one: list[int] = []
    untidy: set[str] = set()
    fast: list[int] = []
    remembered = sorted({*asked, *(r.resource for r in held.values())})
    for ctx in contexts.values():
        memo.remember(ctx, remembered)
    for i, req in enumerate(reqs):
        found = contexts.get(req.tenant_id)
        if found is None:
            one_by_one.append(i)  # an unknown tenant: its error
        elif found.has_expired_reservations or found.has_due_grants:
            one_by_one.append(i)
            untidy.add(req.tenant_id)
        else:
            fast.append(i)
            tenants.setdefault(req.tenant_id, _Tenant(found))
    for (tenant_id, request_id), taken in reads.taken.items():
        if tenant_id in tenants:
            tenants[tenant_id].taken[request_id] = taken

    # round trip 2, only when the guess missed (first sight of a tenant, a changed plan)
    lock_keys, wallet_tenants = _locks([reqs[i] for i in fast], tenants, held, now, shared)
    missed_keys = [k for k in lock_keys if k not in locked.counters]
    missed_wallets = [t for t in wallet_tenants if t not in guessed_wallets]
    if missed_keys or missed_wallets:
        more = await bs.send_locks(wire, missed_keys, missed_wallets)()
        locked.counters |= more.counters
        locked.wallets |= more.wallets
        locked.grants |= more.grants
    created: list[TenantKey] = []
    for (t, resource, period, start), (used, reserved, new) in locked.counters.items():
        if t in tenants:
            tenants[t].counts[(resource, period, start)] = (used, reserved)
        if new:
            created.append((t, resource, period, start))
    for t, wallet in locked.wallets.items():
        if t in tenants:
            tenants[t].wallet = wallet
            tenants[t].grants = locked.grants.get(t, [])

    writes = BatchWrites()
    results: dict[int, Result] = {}
    denials: list[tuple[int, ConsumeRequest]] = []
    for i in fast:
        req = reqs[i]
        state = tenants[req.tenant_id]
        result: Result
        try:
            if isinstance(req, CommitRequest):
                result = _commit_one(state, req, held, now, prices, writes, shared)
                memo.settle(req.tenant_id, req.reservation_id)
            elif isinstance(req, ReleaseRequest):
                result = _release_one(state, req, held, writes)
                memo.settle(req.tenant_id, req.reservation_id)
            else:
                result = _decide_one(state, req, now, prices, past_due_grace, writes, shared)
                if result.reservation_id and not result.replayed:
                    memo.hold(req.tenant_id, writes.reservations[-1].row())
        except QuotaError as exc:
            result = exc
        results[i] = result
        if isinstance(result, Decision) and not result.allowed and not result.replayed:
            assert isinstance(req, ConsumeRequest)
            denials.append((i, req))

    # the last round trip (the caller's): the writes, the offers for denials, the commit
    for t, state in tenants.items():
        for key, (used, reserved) in state.counts.items():
            was_used, was_reserved, _ = locked.counters[(t, *key)]
            if (used, reserved) != (was_used, was_reserved):
                writes.deltas[(t, *key)] = (used - was_used, reserved - was_reserved)
    writes.dropped = [k for k in created if k not in writes.deltas]
    writes_p = bs.send_writes(wire, writes, now, now + idempotency_ttl)
    wanted = sorted(
        {
            (req.resource, _current_plan(results[i]))
            for i, req in denials
            if _reason(results[i]) is not Reason.PAYMENT_PAST_DUE
        },
        key=lambda w: (w[0], w[1] or ""),
    )
    offers_p = bs.send_offers(wire, wanted) if wanted else None

    async def finish() -> None:
        await writes_p()
        offers: dict[tuple[str, str | None], list[PlanOffer]] = await offers_p() if offers_p else {}
        for i, req in denials:
            denial = results[i]
            assert isinstance(denial, Decision)
            upgrade = ""
            if denial.reason is not Reason.PAYMENT_PAST_DUE:
                found = offers[(req.resource, _current_plan(denial))]
                upgrade = decisions.choose_upgrade(denial, req.amount, found)
            results[i] = replace(denial, upgrade_plan_id=upgrade)

    return BatchOutcome(results, one_by_one, untidy, finish)


def _locks(
    reqs: Iterable[Request],
    tenants: dict[str, _Tenant],
    held: Held,
    now: datetime,
    shared: dict[tuple[Period, str, datetime], Window],
) -> tuple[list[TenantKey], list[str]]:
    """The counter rows the requests touch, and the tenants whose wallet (with grants) may
    have to pay an overage or give back a hold."""
    keys: set[TenantKey] = set()
    wallets: set[str] = set()
    for req in reqs:
        tenant_id = req.tenant_id
        state = tenants.get(tenant_id)
        if state is None:
            continue
        if isinstance(req, ReleaseRequest):
            res = held.get((tenant_id, req.reservation_id))
            if res is not None and res.status == "active":
                keys.update((tenant_id, *k) for k in res.windows)
                if res.held_micros:
                    wallets.add(tenant_id)
            continue
        if isinstance(req, CommitRequest):
            res = held.get((tenant_id, req.reservation_id))
            if res is None or res.status in SETTLED:
                continue  # an error or a replay: nothing to lock
            resource, pays = res.resource, True
            if res.status == "active":  # its amount is still in the counters
                keys.update((tenant_id, *k) for k in res.windows)
                if res.held_micros:
                    wallets.add(tenant_id)
        else:
            resource, pays = req.resource, not req.dry_run
        quotas, windows = state.plan(resource, now, shared)
        keys.update((tenant_id, resource, w.period, w.start) for w in windows)
        if (
            pays
            and req.tokens is not None
            and not state.ctx.unlimited
            and any(q.overage is Overage.WALLET for q in quotas)
        ):
            wallets.add(tenant_id)
    return list(keys), sorted(wallets)


def _decide_one(
    state: _Tenant,
    req: ConsumeRequest,
    now: datetime,
    prices: dict[tuple[str, str], ModelPrice],
    past_due_grace: timedelta,
    writes: BatchWrites,
    shared: dict[tuple[Period, str, datetime], Window],
) -> Decision:
    """One request, as QuotaEngine._admit decides it, against the batch's state so far."""
    fingerprint = ""
    if not req.dry_run:
        fingerprint = req.admission_fingerprint()
        prior = state.taken.get(req.request_id)
        if prior is not None:
            operation, request_hash, response = prior
            if request_hash != fingerprint:
                raise decisions.reused_request_id(req.request_id, operation)
            return Decision.from_json(response, replayed=True)
    ctx = state.ctx
    cost = _cost(req.tokens, prices, now)
    quotas, windows = state.plan(req.resource, now, shared)
    counts = state.counts
    verdict = decisions.gate(ctx, quotas, now, past_due_grace)
    if verdict is None:
        wcs = decisions.window_counts(quotas, windows, counts, req.resource)
        verdict = decide(wcs, req.amount, cost, NO_LIMIT, unlimited=ctx.unlimited)
        if verdict.allowed and verdict.charge_micros > 0:
            if req.dry_run:
                balance, held = state.live_micros(), 0
            else:
                balance, held = state.wallet or (0, 0)
            verdict = decide(wcs, req.amount, cost, balance - held, unlimited=ctx.unlimited)
    if not verdict.allowed:
        return decisions.denial(state.context(), quotas, windows, counts, req, cost, verdict, now)
    if req.dry_run:
        return decisions.allowed(state.context(), quotas, windows, counts, req, cost)
    charge = verdict.charge_micros
    ttl = req.hold_seconds
    if charge:
        assert state.wallet is not None  # decide() let the wallet pay, so it was locked
        balance = state.wallet[0] - (charge if ttl is None else 0)  # a hold debits nothing
    else:
        balance = state.live_micros()
    decision = decisions.allowed(
        ctx, quotas, windows, counts, req, cost, wallet_balance_micros=balance
    )
    if ttl is None:
        decision = replace(decision, usage_record_id=new_id("ur", now))
    else:
        expires_at = now + timedelta(seconds=ttl)
        decision = replace(decision, reservation_id=new_id("rsv", now), expires_at=expires_at)
    _apply(state, req, quotas, windows, cost, charge, decision, fingerprint, now, writes)
    return decision


def _apply(
    state: _Tenant,
    req: ConsumeRequest,
    quotas: tuple[Quota, ...],
    windows: tuple[Window, ...],
    cost: int,
    charge: int,
    decision: Decision,
    fingerprint: str,
    now: datetime,
    writes: BatchWrites,
) -> None:
    """Queue the writes of an allowed request and carry its effect into the batch state."""
    tenant_id = req.tenant_id
    for note in decisions.thresholds(quotas, windows, state.counts, req.resource, req.amount):
        writes.notes.append((tenant_id, *note))
    held = req.hold_seconds is not None
    used, reserved = (0, req.amount) if held else (req.amount, 0)
    keys = [(req.resource, w.period, w.start) for w in windows]
    for key in keys:  # the writes' deltas are these counts less the locked ones (decide_batch)
        decisions.add_delta(state.counts, key, used, reserved)
    if held:  # a reservation, and a hold on the wallet for what it may cost
        assert decision.expires_at is not None
        writes.reservations.append(
            bs.NewReservation(
                tenant_id,
                decision.reservation_id,
                req.request_id,
                req.resource,
                req.amount,
                keys,
                charge,
                req.labels,
                decision.expires_at,
            )
        )
        if charge:
            assert state.wallet is not None
            balance, on_hold = state.wallet
            state.wallet = writes.wallets[tenant_id] = (balance, on_hold + charge)
    else:  # a usage record, and a debit of the grants, soonest-expiring first
        record_id = decision.usage_record_id
        record = decisions.consume_record(req, record_id, state.ctx.plan_id, cost, charge, now)
        writes.records.append((tenant_id, record))
        if charge:
            assert state.wallet is not None
            _debit(state, tenant_id, allocate_debit(state.grants, charge), record_id, writes)
            balance = decision.wallet_balance_micros
            state.wallet = writes.wallets[tenant_id] = (balance, state.wallet[1])
            state.spent += charge
    response = decision.to_json()
    state.taken[req.request_id] = (req.OPERATION, fingerprint, response)
    writes.claims.append((tenant_id, req.request_id, req.OPERATION, fingerprint, response))


def _commit_one(
    state: _Tenant,
    req: CommitRequest,
    held: Held,
    now: datetime,
    prices: dict[tuple[str, str], ModelPrice],
    writes: BatchWrites,
    shared: dict[tuple[Period, str, datetime], Window],
) -> CommitResult:
    """One Commit, as QuotaEngine._commit decides it, against the batch's state so far:
    the reservation's amount leaves the counters' `reserved` (while it is still active),
    the committed amount is added to `used`, the wallet pays what went over a wallet quota
    (as far as it can) and gives back the hold."""
    tenant_id = req.tenant_id
    fingerprint = req.fingerprint()
    res = held.get((tenant_id, req.reservation_id))
    if res is None:
        raise unknown_reservation(tenant_id, req.reservation_id)
    settled = decisions.settled_commit(res, fingerprint)
    if settled is not None:
        return settled
    cost = _cost(req.tokens, prices, now)
    ctx = state.ctx
    quotas, windows = state.plan(res.resource, now, shared)
    live = res.status == "active"  # its amount is still in the counters
    counts = dict(state.counts)
    if live:
        for k in res.windows:
            decisions.add_delta(counts, k, 0, -res.amount)
    wcs = decisions.window_counts(quotas, windows, counts, res.resource)
    charge, over_limit = decisions.commit_charge(wcs, req.amount, cost, ctx.unlimited)
    held_back = res.held_micros if live else 0
    paid = 0
    taken: list[tuple[str, int]] = []
    wallet: tuple[int, int] | None = None
    if charge or held_back:  # a missing wallet is created empty, as lock_wallet does
        balance, on_hold = state.wallet or (0, 0)
        paid = max(0, min(charge, balance - (on_hold - held_back)))
        taken = allocate_debit(state.grants, paid) if paid else []
        wallet = (balance - paid, on_hold - held_back)
    # nothing above changed the batch's state: from here on the Commit cannot fail
    record_id = new_id("ur", now)
    keys = [(res.resource, w.period, w.start) for w in windows]
    for note in decisions.thresholds(quotas, windows, counts, res.resource, req.amount):
        writes.notes.append((tenant_id, *note))
    result = CommitResult(
        usage_record_id=record_id,
        cost_micros=cost,
        windows=decisions.window_views(
            quotas, windows, counts, res.resource, req.amount, ctx.unlimited
        ),
        wallet_balance_micros=state.live_micros() if wallet is None else wallet[0],
    )
    for key in keys:
        decisions.add_delta(counts, key, req.amount, 0)
    state.counts = counts
    if wallet is not None:
        _debit(state, tenant_id, taken, record_id, writes)
        state.wallet = writes.wallets[tenant_id] = wallet
        state.spent += paid
    over = over_limit or paid < charge
    record = decisions.commit_record(req, res, record_id, ctx.plan_id, cost, paid, over, now)
    writes.records.append((tenant_id, record))
    response = {**result.to_json(), "fingerprint": fingerprint}
    writes.finished.append((tenant_id, res.reservation_id, "committed", record_id, response))
    held[(tenant_id, res.reservation_id)] = replace(
        res, status="committed", commit_response=response
    )
    return result


def _cost(
    tokens: TokenUsage | None, prices: dict[tuple[str, str], ModelPrice], now: datetime
) -> int:
    """What the tokens cost at the price in effect (missing_price when there is none)."""
    if tokens is None:
        return 0
    price = prices.get((tokens.provider, tokens.model))
    if price is None:
        raise missing_price(tokens.provider, tokens.model, now)
    return cost_micros(tokens, price)


def _release_one(state: _Tenant, req: ReleaseRequest, held: Held, writes: BatchWrites) -> bool:
    """One Release, as QuotaEngine._release decides it: an active reservation's amount
    leaves the counters' `reserved` and its hold the wallet; any other answers False."""
    tenant_id = req.tenant_id
    res = held.get((tenant_id, req.reservation_id))
    if res is None:
        raise unknown_reservation(tenant_id, req.reservation_id)
    if res.status != "active":
        return False
    for k in res.windows:
        decisions.add_delta(state.counts, k, 0, -res.amount)
    if res.held_micros:
        balance, on_hold = state.wallet or (0, 0)
        state.wallet = writes.wallets[tenant_id] = (balance, on_hold - res.held_micros)
    writes.finished.append((tenant_id, res.reservation_id, "released", None, None))
    held[(tenant_id, res.reservation_id)] = replace(res, status="released")
    return True


def _debit(
    state: _Tenant,
    tenant_id: str,
    taken: list[tuple[str, int]],
    record_id: str,
    writes: BatchWrites,
) -> None:
    """Take `taken` (grant_id, micros) from the tenant's grants, with its ledger entries."""
    left = dict(taken)
    state.grants = [
        LiveGrant(g.grant_id, g.remaining_micros - left[g.grant_id], g.expires_at)
        if g.grant_id in left
        else g
        for g in state.grants
    ]
    writes.debits += [(tenant_id, g, m) for g, m in taken]
    writes.ledger += [(tenant_id, g, "debit", -m, record_id, "usage") for g, m in taken]


def _current_plan(result: Result) -> str | None:
    assert isinstance(result, Decision)
    return result.upgrade_plan_id or None  # a denial carries the current plan until here


def _reason(result: Result) -> Reason | None:
    return result.reason if isinstance(result, Decision) else None
