"""One transaction of quota decisions, for a lone request or a coalesced batch alike: load
the state the requests need, decide them in order with the core, write what changed."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import replace
from datetime import datetime

from billing_core.errors import QuotaError
from billing_core.quota import core, outcomes
from billing_core.quota.answers import Decision, Result, Tidied
from billing_core.quota.core import Held, Rules, SharedWindows, TenantState
from billing_core.quota.model import SETTLED, Changes, PlanOffer, Reservation, TenantContext
from billing_core.quota.model import TenantKey as Key
from billing_core.quota.ports import Pending, QuotaSession
from billing_core.quota.requests import (
    AdmitAllRequest,
    CommitRequest,
    ConsumeRequest,
    FreeRequest,
    ReleaseRequest,
    ReportRequest,
    Request,
    TidyRequest,
)
from billing_core.rules.limits import Reason
from billing_core.rules.resources import Overage


class ShapeMemo:
    """What each (tenant, resource) looked like in the last transaction — its timezone,
    anchor and quotas — so that the next one can lock its counter rows in the round trip
    that reads the contexts; likewise the reservations this process made, until they are
    settled. Only a guess: every transaction reads the contexts again and locks what the
    guess missed, so a changed plan is enforced at once. Forgotten wholesale past `limit`."""

    def __init__(self, limit: int = 100_000) -> None:
        self._limit = limit
        self._seen: dict[tuple[str, str], TenantContext] = {}
        self._reservations: Held = {}

    def context(self, tenant_id: str, resource: str) -> TenantContext | None:
        return self._seen.get((tenant_id, resource))

    def remember(self, ctx: TenantContext, resources: Iterable[str]) -> None:
        if len(self._seen) >= self._limit:
            self._seen.clear()
        for resource in resources:
            self._seen[(ctx.tenant_id, resource)] = ctx

    def reservation(self, tenant_id: str, reservation_id: str) -> Reservation | None:
        return self._reservations.get((tenant_id, reservation_id))

    def hold(self, tenant_id: str, res: Reservation) -> None:
        if len(self._reservations) >= self._limit:
            self._reservations.clear()
        self._reservations[(tenant_id, res.reservation_id)] = res

    def settle(self, tenant_id: str, reservation_id: str) -> None:
        self._reservations.pop((tenant_id, reservation_id), None)


def writes_for_tenant(req: Request) -> bool:
    """Whether the request may write for its tenant (only a dry run never does)."""
    return not (isinstance(req, ConsumeRequest) and req.dry_run)


async def decide_batch(
    session: QuotaSession,
    reqs: Sequence[Request],
    now: datetime,
    *,
    memo: ShapeMemo,
    rules: Rules,
) -> Pending[list[Result]]:
    """Decide validated requests in order inside the session's transaction and queue their
    writes; returns what fetches the answers once the transaction is committed.

    Round trips, each carrying every statement queued before it: (1) the reservations to
    settle, locked; the contexts, prices and taken request_ids read, with the rows the
    ShapeMemo predicts locked in the same statement; (2) only for tenants with reservations
    past their expiry: those; (3) only when the prediction missed (a tenant seen for the
    first time, a changed plan): the rest of the rows — a stale prediction costs a round
    trip, never correctness; (4) the writes and the upgrade offers, with the store's
    COMMIT. Tenants the transaction writes for are tidied first (core.tidy)."""
    flat = _members(reqs)  # what the rows to read and lock are found from
    admissions = [r for r in flat if isinstance(r, ConsumeRequest)]
    asked = sorted(
        {r.resource for r in flat if isinstance(r, ConsumeRequest | FreeRequest | ReportRequest)}
    )
    settling = sorted(
        {
            (r.tenant_id, r.reservation_id)
            for r in flat
            if isinstance(r, CommitRequest | ReleaseRequest)
        }
    )
    # a Commit's resource is its reservation's, read in the same round trip: all quotas then
    resources = None if any(isinstance(r, CommitRequest) for r in flat) else asked
    models = sorted(
        {
            (r.tokens.provider, r.tokens.model)
            for r in flat
            if isinstance(r, ConsumeRequest | CommitRequest | ReportRequest)
            and r.tokens is not None
        }
    )
    keys = sorted(
        {(r.tenant_id, r.request_id) for r in admissions if not r.dry_run}
        | {(r.tenant_id, r.request_id) for r in flat if isinstance(r, FreeRequest | ReportRequest)}
    )
    shared: SharedWindows = {}

    # round trip 1: reservations, contexts, prices, taken request_ids, predicted locks
    reservations_p = session.lock_reservations(settling) if settling else None
    predicted_held: Held = {}
    predicted: dict[str, TenantState] = {}
    for req in flat:
        if isinstance(req, ConsumeRequest | FreeRequest | ReportRequest):
            resource = req.resource
        elif isinstance(req, CommitRequest | ReleaseRequest):
            made = memo.reservation(req.tenant_id, req.reservation_id)
            if made is None:
                continue
            predicted_held[(req.tenant_id, req.reservation_id)] = made
            resource = made.resource
        else:
            continue
        if req.tenant_id not in predicted and (seen := memo.context(req.tenant_id, resource)):
            predicted[req.tenant_id] = TenantState(seen)
    predicted_keys, predicted_wallets = _rows_to_lock(
        flat, predicted, predicted_held, now, shared, tidying=()
    )
    reads_p = session.read(
        sorted({r.tenant_id for r in reqs}), resources, models, keys, now,
        lock_counters=predicted_keys, lock_wallets=predicted_wallets,
    )  # fmt: skip
    held = await reservations_p() if reservations_p else {}
    reads = await reads_p()
    locked = reads.locked

    remembered = sorted({*asked, *(r.resource for r in held.values())})
    for ctx in reads.contexts.values():
        memo.remember(ctx, remembered)
    tenants: dict[str, TenantState] = {}
    results: dict[int, Result] = {}
    for i, req in enumerate(reqs):
        found = reads.contexts.get(req.tenant_id)
        if found is None:
            results[i] = core.unknown_tenant(req.tenant_id)
        else:
            tenants.setdefault(req.tenant_id, TenantState(found))
    for (tenant_id, request_id), stored in reads.taken.items():
        if tenant_id in tenants:
            tenants[tenant_id].taken[request_id] = stored
    decided = [i for i in range(len(reqs)) if i not in results]
    writing = {reqs[i].tenant_id for i in decided if writes_for_tenant(reqs[i])}

    # round trip 2, only for tenants with reservations past their expiry
    lapsed = [t for t, state in tenants.items() if state.ctx.has_expired_reservations]
    if lapsed:
        locking = [t for t in lapsed if t in writing]
        reading = [t for t in lapsed if t not in writing]
        lapsed_p = session.lapsed_reservations(locking, now, lock=True) if locking else None
        seen_p = session.lapsed_reservations(reading, now, lock=False) if reading else None
        for pending in (lapsed_p, seen_p):
            for tenant_id, found_lapsed in (await pending() if pending else {}).items():
                tenants[tenant_id].lapsed = found_lapsed

    # round trip 3, only when the prediction missed
    lock_keys, wallet_tenants = _rows_to_lock(
        _members([reqs[i] for i in decided]), tenants, held, now, shared, tidying=writing
    )
    missed_keys = [k for k in lock_keys if k not in locked.counters]
    missed_wallets = [t for t in wallet_tenants if t not in predicted_wallets]
    if missed_keys or missed_wallets:
        more = await session.lock(missed_keys, missed_wallets, now)()
        locked.counters |= more.counters
        locked.wallets |= more.wallets
        locked.grants |= more.grants
    empty: list[Key] = []  # counters locked empty: dropped again unless used
    for (t, resource, period, start), (used, reserved, was_empty) in locked.counters.items():
        if t in tenants:
            tenants[t].counts[(resource, period, start)] = (used, reserved)
        if was_empty:
            empty.append((t, resource, period, start))
    for t, wallet in locked.wallets.items():
        if t in tenants:
            tenants[t].wallet = wallet
            tenants[t].grants = locked.grants.get(t, [])

    # the decisions, in memory, in order
    changes = Changes()
    tidied: dict[str, Tidied] = {}
    for t, state in tenants.items():
        if t in writing:
            tidied[t] = core.tidy(state, now, held, changes)
        else:
            core.leave_out_lapsed(state)
    denials: list[tuple[int, ConsumeRequest]] = []
    for i in decided:
        req = reqs[i]
        state = tenants[req.tenant_id]
        result: Result
        try:
            if isinstance(req, CommitRequest):
                result = core.commit(state, req, held, now, reads.prices, changes, shared)
                memo.settle(req.tenant_id, req.reservation_id)
            elif isinstance(req, ReleaseRequest):
                result = core.release(state, req, held, changes)
                memo.settle(req.tenant_id, req.reservation_id)
            elif isinstance(req, FreeRequest):
                result = core.free(state, req, now, changes, shared)
            elif isinstance(req, ReportRequest):
                result = core.report(state, req, now, reads.prices, rules, changes)
            elif isinstance(req, TidyRequest):
                result = tidied.pop(req.tenant_id, Tidied())
            elif isinstance(req, AdmitAllRequest):
                result = core.admit_all(state, req, now, reads.prices, rules, changes, shared)
            else:
                result = core.admit(state, req, now, reads.prices, rules, changes, shared)
                if result.reservation_id and not result.replayed:
                    memo.hold(req.tenant_id, changes.reservations[-1].as_live())
                elif not result.allowed and not result.replayed:
                    denials.append((i, req))
        except QuotaError as exc:
            result = exc
        results[i] = result

    # round trip 4 (with the store's COMMIT): the writes and the offers for denials
    for t in writing:
        for key, (used, reserved) in tenants[t].counts.items():
            was_used, was_reserved, _ = locked.counters[(t, *key)]
            if (used, reserved) != (was_used, was_reserved):
                changes.deltas[(t, *key)] = (used - was_used, reserved - was_reserved)
    changes.dropped = [k for k in empty if k not in changes.deltas]
    claimed = {(c[0], c[1]) for c in changes.claims}
    changes.unclaimed = [
        k for k in keys if k not in reads.taken and k not in claimed and k[0] in tenants
    ]
    writes_p = session.write(changes, now, now + rules.idempotency_ttl)
    wanted = sorted(
        {
            (req.resource, _current_plan(results[i]))
            for i, req in denials
            if _reason(results[i]) is not Reason.PAYMENT_PAST_DUE
        },
        key=lambda w: (w[0], w[1] or ""),
    )
    offers_p = session.offers(wanted) if wanted else None

    async def answers() -> list[Result]:
        await writes_p()
        offers: dict[tuple[str, str | None], list[PlanOffer]] = await offers_p() if offers_p else {}
        for i, req in denials:
            denial = results[i]
            assert isinstance(denial, Decision)
            upgrade = ""
            if denial.reason is not Reason.PAYMENT_PAST_DUE:
                found = offers[(req.resource, _current_plan(denial))]
                upgrade = outcomes.choose_upgrade(denial, req.amount, found)
            results[i] = replace(denial, upgrade_plan_id=upgrade)
        return [results[i] for i in range(len(reqs))]

    return answers


def _members(reqs: Iterable[Request]) -> list[Request]:
    """The requests, with each AdmitAllRequest's members in its place."""
    return [m for r in reqs for m in (r.members if isinstance(r, AdmitAllRequest) else (r,))]


def _rows_to_lock(
    reqs: Iterable[Request],
    tenants: dict[str, TenantState],
    held: Held,
    now: datetime,
    shared: SharedWindows,
    *,
    tidying: Collection[str],
) -> tuple[list[Key], list[str]]:
    """The counter rows the requests touch, and the tenants whose wallet (with its grants)
    may pay an overage, give back a hold or write off a grant past its expiry; with those
    that `tidying` tenants' reservations past their expiry touch."""
    keys: set[Key] = set()
    wallets: set[str] = set()
    for tenant_id in tidying:
        for lapsed in tenants[tenant_id].lapsed:
            keys.update((tenant_id, *k) for k in lapsed.windows)
            if lapsed.held_micros:
                wallets.add(tenant_id)
        if tenants[tenant_id].ctx.has_due_grants:
            wallets.add(tenant_id)
    touched: dict[tuple[str, str], bool] = {}  # (tenant, resource): may a request pay
    for req in reqs:
        tenant_id = req.tenant_id
        if tenant_id not in tenants or isinstance(req, TidyRequest):
            continue
        if isinstance(req, ReleaseRequest | CommitRequest):
            res = held.get((tenant_id, req.reservation_id))
            if res is None or res.status in SETTLED:
                continue  # an error or a replay: nothing to lock
            if res.status == "active":  # its amount is still in the counters
                keys.update((tenant_id, *k) for k in res.windows)
                if res.held_micros:
                    wallets.add(tenant_id)
            if isinstance(req, ReleaseRequest):
                continue
            resource, pays = res.resource, req.tokens is not None
        elif isinstance(req, FreeRequest):
            resource, pays = req.resource, False
        elif isinstance(req, ReportRequest):  # the windows of its moment; no wallet pays
            _, at = tenants[tenant_id].windows_at(req.resource, req.occurred_at)
            keys.update((tenant_id, req.resource, w.period, w.start) for w in at)
            continue
        else:
            assert isinstance(req, ConsumeRequest)  # groups come as their members
            resource, pays = req.resource, not req.dry_run and req.tokens is not None
        touched[(tenant_id, resource)] = touched.get((tenant_id, resource), False) or pays
    for (tenant_id, resource), pays in touched.items():
        state = tenants[tenant_id]
        quotas, windows = state.plan(resource, now, shared)
        keys.update((tenant_id, resource, w.period, w.start) for w in windows)
        if pays and not state.ctx.unlimited and any(q.overage is Overage.WALLET for q in quotas):
            wallets.add(tenant_id)
    return list(keys), sorted(wallets)


def _current_plan(result: Result) -> str | None:
    assert isinstance(result, Decision)
    return result.upgrade_plan_id or None  # a denial carries the current plan until here


def _reason(result: Result) -> Reason | None:
    return result.reason if isinstance(result, Decision) else None
