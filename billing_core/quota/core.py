"""The decision core: every quota rule, written once. Each request is decided against its
tenant's state as the transaction has left it so far, and what it changes is carried into
that state and queued in `Changes`; a refused request raises before it changes anything."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from billing_core.errors import InvalidRequest, NotFound, QuotaError
from billing_core.ids import new_id
from billing_core.quota import outcomes
from billing_core.quota.answers import (
    CommitResult,
    Decision,
    FreeResult,
    GroupDecision,
    ReportResult,
    Tidied,
    WindowView,
)
from billing_core.quota.model import (
    Changes,
    Counts,
    NewReservation,
    Reservation,
    StoredKey,
    TenantContext,
)
from billing_core.quota.outcomes import add_delta
from billing_core.quota.requests import (
    AdmitAllRequest,
    CommitRequest,
    ConsumeRequest,
    FreeRequest,
    ReleaseRequest,
    ReportRequest,
)
from billing_core.rules.limits import Quota, decide
from billing_core.rules.periods import EPOCH, Window, tenant_zone, window_for
from billing_core.rules.pricing import ModelPrice, TokenUsage, cost_micros, missing_price
from billing_core.rules.resources import Period
from billing_core.rules.wallet import LiveGrant, allocate_debit

Prices = dict[tuple[str, str], ModelPrice]
Held = dict[tuple[str, str], Reservation]  # (tenant_id, reservation_id): the reservation
# windows computed once per transaction: daily/weekly depend on the timezone, monthly on
# the billing anchor
SharedWindows = dict[tuple[Period, str, datetime], Window]


@dataclass(frozen=True, slots=True)
class Rules:
    """The quota settings a decision depends on."""

    past_due_grace: timedelta = timedelta(days=3)
    idempotency_ttl: timedelta = timedelta(hours=24)


@dataclass(slots=True)
class TenantState:
    """One tenant's state as the transaction goes, request after request."""

    ctx: TenantContext
    counts: Counts = field(default_factory=dict)
    spent: int = 0  # wallet micros charged since ctx was last brought up to date
    wallet: tuple[int, int] | None = None  # locked (balance, held); None: no wallet row
    grants: list[LiveGrant] = field(default_factory=list)  # in the order they pay
    taken: dict[str, StoredKey] = field(default_factory=dict)  # live request_ids
    # reservations past their expiry that still count: released by tidy() or, in a
    # transaction that writes nothing for the tenant, only left out of its counts
    lapsed: list[Reservation] = field(default_factory=list)
    windows: dict[str, tuple[tuple[Quota, ...], tuple[Window, ...]]] = field(default_factory=dict)

    def plan(
        self, resource: str, now: datetime, shared: SharedWindows
    ) -> tuple[tuple[Quota, ...], tuple[Window, ...]]:
        """The quotas of `resource` and their current windows."""
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

    def windows_at(
        self, resource: str, at: datetime
    ) -> tuple[tuple[Quota, ...], tuple[Window, ...]]:
        """The quotas of `resource` and the windows that contain the moment `at` (a
        reported usage's), which may be earlier ones than the current."""
        quotas = self.ctx.quotas.get(resource, ())
        zone = tenant_zone(self.ctx.timezone)
        return quotas, tuple(window_for(q.period, at, zone, self.ctx.anchor) for q in quotas)

    def snapshot(self) -> TenantState:
        """A copy to go back to (restore) when decisions made since must not count."""
        return TenantState(
            self.ctx, dict(self.counts), self.spent, self.wallet, list(self.grants),
            dict(self.taken), list(self.lapsed), self.windows,
        )  # fmt: skip

    def restore(self, saved: TenantState) -> None:
        self.ctx, self.counts, self.spent, self.wallet = (
            saved.ctx, saved.counts, saved.spent, saved.wallet
        )  # fmt: skip
        self.grants, self.taken, self.lapsed = saved.grants, saved.taken, saved.lapsed

    def live_micros(self) -> int:
        """The live wallet as the transaction has left it so far."""
        return self.ctx.wallet_live_micros - self.spent

    def context(self) -> TenantContext:
        """The context with the live wallet as the transaction has left it so far."""
        if self.spent:
            self.ctx = replace(self.ctx, wallet_live_micros=self.live_micros())
            self.spent = 0
        return self.ctx


def cost(tokens: TokenUsage | None, prices: Prices, now: datetime) -> int:
    """What the tokens cost at the price in effect (missing_price when there is none)."""
    if tokens is None:
        return 0
    price = prices.get((tokens.provider, tokens.model))
    if price is None:
        raise missing_price(tokens.provider, tokens.model, now)
    return cost_micros(tokens, price)


def unknown_tenant(tenant_id: str) -> NotFound:
    return NotFound(f"unknown tenant {tenant_id!r}")


def unknown_reservation(tenant_id: str, reservation_id: str) -> NotFound:
    return NotFound(f"unknown reservation {reservation_id!r} for tenant {tenant_id!r}")


# --- lazily expiring state -----------------------------------------------------------------


def tidy(state: TenantState, now: datetime, held: Held, changes: Changes) -> Tidied:
    """Release the reservations past their expiry (their amounts leave the counters, their
    holds the wallet) and expire the grants past theirs (what they had left leaves the
    balance, with a ledger entry). Runs first for every tenant a transaction writes for, so
    expired state never counts and is cleared by whoever meets it."""
    tenant_id = state.ctx.tenant_id
    hold_back = 0
    for res in state.lapsed:
        for key in res.windows:
            add_delta(state.counts, key, 0, -res.amount)
        hold_back += res.held_micros
        changes.finished[(tenant_id, res.reservation_id)] = ("expired", None, None)
        if (tenant_id, res.reservation_id) in held:
            held[(tenant_id, res.reservation_id)] = replace(res, status="expired")
    due = [g for g in state.grants if g.expires_at is not None and g.expires_at <= now]
    written_off = sum(g.remaining_micros for g in due)
    for grant in due:
        changes.expired_grants.append((tenant_id, grant.grant_id))
        if grant.remaining_micros:
            changes.ledger.append(
                (
                    tenant_id,
                    grant.grant_id,
                    "expire",
                    -grant.remaining_micros,
                    None,
                    "grant expired",
                )
            )
    if due:
        state.grants = [g for g in state.grants if g not in due]
    if (hold_back or written_off) and state.wallet is not None:
        balance, on_hold = state.wallet
        state.wallet = changes.wallets[tenant_id] = (balance - written_off, on_hold - hold_back)
    tidied = Tidied(len(state.lapsed), len(due))
    state.lapsed = []
    return tidied


def leave_out_lapsed(state: TenantState) -> None:
    """Reservations past their expiry stop counting, in a transaction that writes nothing
    for the tenant (its dry runs): in its counts only, nothing is released."""
    for res in state.lapsed:
        for key in res.windows:
            if key in state.counts:
                add_delta(state.counts, key, 0, -res.amount)
    state.lapsed = []


# --- CheckAndConsume and Reserve ---------------------------------------------------------


def admit(
    state: TenantState,
    req: ConsumeRequest,
    now: datetime,
    prices: Prices,
    rules: Rules,
    changes: Changes,
    shared: SharedWindows,
) -> Decision:
    """CheckAndConsume, or Reserve for a ReserveRequest: allowed only if every window of the
    resource (and the wallet, past a wallet-overage limit) can take the amount. A denial or
    a dry run changes nothing; an allowed request counts at once (a usage record, the
    wallet paying any overage) or holds its amount until Commit or Release (a reservation,
    what it may cost held on the wallet)."""
    fingerprint = ""
    if not req.dry_run:
        fingerprint = req.admission_fingerprint()
        prior = state.taken.get(req.request_id)
        if prior is not None:
            if prior.request_hash != fingerprint:
                raise outcomes.reused_request_id(req.request_id, prior.operation)
            return Decision.from_json(prior.response, replayed=True)
    ctx = state.ctx
    price = cost(req.tokens, prices, now)
    quotas, windows = state.plan(req.resource, now, shared)
    counts = state.counts
    verdict = outcomes.gate(ctx, quotas, now, rules.past_due_grace)
    if verdict is None:
        # what the wallet can pay for the part past a wallet-overage limit: the live wallet
        # for a dry run, the locked one less its holds for a real request
        if req.dry_run:
            available = state.live_micros()
        else:
            balance, on_hold = state.wallet or (0, 0)
            available = balance - on_hold
        window_counts = outcomes.window_counts(quotas, windows, counts, req.resource)
        verdict = decide(window_counts, req.amount, price, available, unlimited=ctx.unlimited)
    if not verdict.allowed:
        return outcomes.denial(state.context(), quotas, windows, counts, req, price, verdict, now)
    if req.dry_run:
        return outcomes.allowed(state.context(), quotas, windows, counts, req, price)
    charge = verdict.charge_micros
    ttl = req.hold_seconds
    if charge:
        assert state.wallet is not None  # decide() let the wallet pay, so it was locked
        balance = state.wallet[0] - (charge if ttl is None else 0)  # a hold debits nothing
    else:
        balance = state.live_micros()
    if ttl is None:
        decision = outcomes.allowed(
            ctx,
            quotas,
            windows,
            counts,
            req,
            price,
            wallet_balance_micros=balance,
            usage_record_id=new_id("ur", now),
        )
    else:
        decision = outcomes.allowed(
            ctx,
            quotas,
            windows,
            counts,
            req,
            price,
            wallet_balance_micros=balance,
            reservation_id=new_id("rsv", now),
            expires_at=now + timedelta(seconds=ttl),
        )
    _count(state, req, quotas, windows, price, charge, decision, fingerprint, now, changes)
    return decision


def admit_all(
    state: TenantState,
    req: AdmitAllRequest,
    now: datetime,
    prices: Prices,
    rules: Rules,
    changes: Changes,
    shared: SharedWindows,
) -> GroupDecision:
    """Several CheckAndConsumes all-or-nothing: each admitted in turn against the state
    the ones before it left; when one is denied (or fails) the state and the queued changes
    go back to where they were, so none counts, and the others are answered as dry runs
    (whether each alone would have been allowed). A retried group replays: every member's
    request_id was claimed together."""
    saved = state.snapshot()
    mark = changes.mark()
    decisions: list[Decision] = []
    try:
        for member in req.members:
            decisions.append(admit(state, member, now, prices, rules, changes, shared))
    except QuotaError:
        state.restore(saved)
        changes.rewind(mark)
        raise
    if all(d.allowed for d in decisions):
        return GroupDecision(True, tuple(decisions))
    state.restore(saved)
    changes.rewind(mark)
    answers = []
    for member, decision in zip(req.members, decisions, strict=True):
        if decision.allowed and not decision.replayed:
            decision = admit(
                state, replace(member, dry_run=True), now, prices, rules, changes, shared
            )
        answers.append(replace(decision, upgrade_plan_id=""))
    return GroupDecision(False, tuple(answers))


def _count(
    state: TenantState,
    req: ConsumeRequest,
    quotas: tuple[Quota, ...],
    windows: tuple[Window, ...],
    price: int,
    charge: int,
    decision: Decision,
    fingerprint: str,
    now: datetime,
    changes: Changes,
) -> None:
    """Carry an allowed admission into the state and queue its writes."""
    tenant_id = req.tenant_id
    _notify(state, quotas, windows, state.counts, req.resource, req.amount, changes)
    holding = req.hold_seconds is not None
    used, reserved = (0, req.amount) if holding else (req.amount, 0)
    keys = [(req.resource, w.period, w.start) for w in windows]
    for key in keys:
        add_delta(state.counts, key, used, reserved)
    if holding:  # a reservation, and a hold on the wallet for what it may cost
        assert decision.expires_at is not None
        changes.reservations.append(
            NewReservation(
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
            state.wallet = changes.wallets[tenant_id] = (balance, on_hold + charge)
    else:  # a usage record, and a debit of the grants, soonest-expiring first
        record_id = decision.usage_record_id
        record = outcomes.consume_record(req, record_id, state.ctx.plan_id, price, charge, now)
        changes.records.append((tenant_id, record))
        if charge:
            assert state.wallet is not None
            _debit(state, allocate_debit(state.grants, charge), record_id, changes)
            state.wallet = changes.wallets[tenant_id] = (
                decision.wallet_balance_micros,
                state.wallet[1],
            )
            state.spent += charge
    _claim(state, req.request_id, req.OPERATION, fingerprint, decision.to_json(), changes)


# --- Commit and Release --------------------------------------------------------------------


def commit(
    state: TenantState,
    req: CommitRequest,
    held: Held,
    now: datetime,
    prices: Prices,
    changes: Changes,
    shared: SharedWindows,
) -> CommitResult:
    """Record what a reservation really used: its amount leaves the counters' `reserved`
    (while it is active), the committed amount is added to `used`, the wallet pays what
    went over a wallet quota (as far as it can: a commit is never refused, the work is
    done) and gives back the hold. A repeated Commit replays the first."""
    tenant_id = req.tenant_id
    fingerprint = req.fingerprint()
    res = held.get((tenant_id, req.reservation_id))
    if res is None:
        raise unknown_reservation(tenant_id, req.reservation_id)
    settled = outcomes.settled_commit(res, fingerprint)
    if settled is not None:
        return settled
    price = cost(req.tokens, prices, now)
    ctx = state.ctx
    quotas, windows = state.plan(res.resource, now, shared)
    active = res.status == "active"  # its amount is still in the counters
    counts = dict(state.counts)
    if active:
        for key in res.windows:
            add_delta(counts, key, 0, -res.amount)
    window_counts = outcomes.window_counts(quotas, windows, counts, res.resource)
    charge, over_limit = outcomes.commit_charge(window_counts, req.amount, price, ctx.unlimited)
    hold_back = res.held_micros if active else 0
    paid = 0
    taken: list[tuple[str, int]] = []
    wallet: tuple[int, int] | None = None
    if charge or hold_back:  # a missing wallet is an empty one
        balance, on_hold = state.wallet or (0, 0)
        # holds can outlast the credits behind them: never a negative payment
        paid = max(0, min(charge, balance - (on_hold - hold_back)))
        taken = allocate_debit(state.grants, paid) if paid else []
        wallet = (balance - paid, on_hold - hold_back)
    # nothing above changed the state: from here on the Commit cannot fail
    record_id = new_id("ur", now)
    _notify(state, quotas, windows, counts, res.resource, req.amount, changes)
    result = CommitResult(
        usage_record_id=record_id,
        cost_micros=price,
        windows=outcomes.window_views(
            quotas, windows, counts, res.resource, req.amount, ctx.unlimited
        ),
        wallet_balance_micros=state.live_micros() if wallet is None else wallet[0],
    )
    for key in [(res.resource, w.period, w.start) for w in windows]:
        add_delta(counts, key, req.amount, 0)
    state.counts = counts
    if wallet is not None:
        _debit(state, taken, record_id, changes)
        state.wallet = changes.wallets[tenant_id] = wallet
        state.spent += paid
    over = over_limit or paid < charge
    record = outcomes.commit_record(req, res, record_id, ctx.plan_id, price, paid, over, now)
    changes.records.append((tenant_id, record))
    response = {**result.to_json(), "fingerprint": fingerprint}
    changes.finished[(tenant_id, res.reservation_id)] = ("committed", record_id, response)
    held[(tenant_id, res.reservation_id)] = replace(
        res, status="committed", commit_response=response
    )
    return result


def release(state: TenantState, req: ReleaseRequest, held: Held, changes: Changes) -> bool:
    """Give an active reservation back: its amount leaves the counters' `reserved` and its
    hold the wallet. False for one that is no longer active."""
    tenant_id = req.tenant_id
    res = held.get((tenant_id, req.reservation_id))
    if res is None:
        raise unknown_reservation(tenant_id, req.reservation_id)
    if res.status != "active":
        return False
    for key in res.windows:
        add_delta(state.counts, key, 0, -res.amount)
    if res.held_micros:
        balance, on_hold = state.wallet or (0, 0)
        state.wallet = changes.wallets[tenant_id] = (balance, on_hold - res.held_micros)
    changes.finished[(tenant_id, res.reservation_id)] = ("released", None, None)
    held[(tenant_id, res.reservation_id)] = replace(res, status="released")
    return True


# --- Free ----------------------------------------------------------------------------------


def free(
    state: TenantState, req: FreeRequest, now: datetime, changes: Changes, shared: SharedWindows
) -> FreeResult:
    """Lower a cumulative resource's level (an agent deleted, storage freed), never below
    zero; a usage record with the negative amount."""
    fingerprint = req.fingerprint()
    prior = state.taken.get(req.request_id)
    if prior is not None:
        if prior.request_hash != fingerprint:
            raise outcomes.reused_request_id(req.request_id, prior.operation)
        return FreeResult.from_json(prior.response, replayed=True)
    quotas, windows = state.plan(req.resource, now, shared)
    if not any(q.period is Period.CUMULATIVE for q in quotas):
        raise InvalidRequest(
            f"{req.resource} has no cumulative quota in the current plan; Free only "
            "lowers cumulative resources (agents, bots, boards, files, storage …)"
        )
    level_key = (req.resource, Period.CUMULATIVE, EPOCH)
    in_use = state.counts[level_key][0]
    if req.amount > in_use:
        raise InvalidRequest(f"cannot free {req.amount:,} {req.resource}: only {in_use:,} in use")
    add_delta(state.counts, level_key, -req.amount, 0)
    record = outcomes.free_record(req, new_id("ur", now), state.ctx.plan_id, now)
    changes.records.append((req.tenant_id, record))
    result = FreeResult(
        outcomes.window_views(quotas, windows, state.counts, req.resource, 0, state.ctx.unlimited)
    )
    _claim(state, req.request_id, "free", fingerprint, result.to_json(), changes)
    return result


# --- ReportUsage ---------------------------------------------------------------------------

# how far ahead of the sidecar's clock a reported moment may be (clocks drift)
REPORT_CLOCK_SKEW = timedelta(minutes=5)


def report(
    state: TenantState,
    req: ReportRequest,
    now: datetime,
    prices: Prices,
    rules: Rules,
    changes: Changes,
) -> ReportResult:
    """Count usage a client allowed while it could not reach the sidecar: never denied,
    into the windows that contain its moment (past a limit if need be, marked so), with a
    fail-open usage record; the wallet pays nothing for it. Its request_id makes it count
    once — also when the CheckAndConsume it stands for was counted after all (the answer
    was lost on the way): then that one's record is the answer."""
    fingerprint = req.fingerprint()
    prior = state.taken.get(req.request_id)
    if prior is not None:
        if prior.operation == req.OPERATION and prior.request_hash == fingerprint:
            return ReportResult.from_json(prior.response, replayed=True)
        admitted = prior.operation == "consume" and prior.response.get("allowed")
        if admitted and prior.request_hash == req.as_admission().admission_fingerprint():
            return ReportResult(
                prior.response["usage_record_id"],
                prior.response["cost_micros"],
                tuple(WindowView.from_json(w) for w in prior.response["windows"]),
                replayed=True,
            )
        raise outcomes.reused_request_id(req.request_id, prior.operation)
    if req.occurred_at > now + REPORT_CLOCK_SKEW:
        raise InvalidRequest("occurred_at is in the future")
    if req.occurred_at < now - rules.idempotency_ttl:
        raise InvalidRequest(
            f"occurred_at is more than {rules.idempotency_ttl} ago: its request_id can no "
            "longer be checked for duplicates, so it cannot be counted safely"
        )
    price = cost(req.tokens, prices, now)
    ctx = state.ctx
    quotas, windows = state.windows_at(req.resource, req.occurred_at)
    counts = state.counts
    window_counts = outcomes.window_counts(quotas, windows, counts, req.resource)
    over = not ctx.unlimited and any(
        w.used + w.reserved + req.amount > w.quota.limit for w in window_counts
    )
    _notify(state, quotas, windows, counts, req.resource, req.amount, changes)
    record_id = new_id("ur", now)
    result = ReportResult(
        record_id,
        price,
        outcomes.window_views(quotas, windows, counts, req.resource, req.amount, ctx.unlimited),
    )
    for w in windows:
        add_delta(counts, (req.resource, w.period, w.start), req.amount, 0)
    record = outcomes.report_record(req, record_id, ctx.plan_id, price, over)
    changes.records.append((req.tenant_id, record))
    _claim(state, req.request_id, req.OPERATION, fingerprint, result.to_json(), changes)
    return result


# --- shared steps --------------------------------------------------------------------------


def _claim(
    state: TenantState,
    request_id: str,
    operation: str,
    fingerprint: str,
    response: dict[str, Any],
    changes: Changes,
) -> None:
    """Take the request_id with the answer its retries replay."""
    state.taken[request_id] = StoredKey(operation, fingerprint, response)
    changes.claims.append((state.ctx.tenant_id, request_id, operation, fingerprint, response))


def _notify(
    state: TenantState,
    quotas: tuple[Quota, ...],
    windows: tuple[Window, ...],
    counts: Counts,
    resource: str,
    amount: int,
    changes: Changes,
) -> None:
    for note in outcomes.thresholds(quotas, windows, counts, resource, amount):
        changes.notes.append((state.ctx.tenant_id, *note))


def _debit(
    state: TenantState, taken: list[tuple[str, int]], record_id: str, changes: Changes
) -> None:
    """Take `taken` (grant_id, micros) from the tenant's grants, with its ledger entries."""
    tenant_id = state.ctx.tenant_id
    left = dict(taken)
    state.grants = [
        LiveGrant(g.grant_id, g.remaining_micros - left[g.grant_id], g.expires_at)
        if g.grant_id in left
        else g
        for g in state.grants
    ]
    changes.debits += [(tenant_id, g, m) for g, m in taken]
    changes.ledger += [(tenant_id, g, "debit", -m, record_id, "usage") for g, m in taken]
