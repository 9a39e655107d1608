"""What the quota engine needs from a database, as Protocols (billing_core/db/quota_store.py
implements them with PostgreSQL).

A QuotaSession is one transaction. Each method queues one statement and returns a Pending:
awaiting it fetches the result, in one round trip for everything queued so far, so a
transaction's reads go out together and its writes leave with its COMMIT.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, TypeVar

from billing_core.quota.model import (
    Changes,
    PlanOffer,
    Reservation,
    StoredKey,
    TenantContext,
    TenantKey,
)
from billing_core.rules.pricing import ModelPrice
from billing_core.rules.wallet import LiveGrant

T = TypeVar("T")
Pending = Callable[[], Awaitable[T]]
# a transaction's work: queue and read its statements, then return what fetches its answer
# once the COMMIT is durable
Work = Callable[["QuotaSession"], Awaitable[Pending[T]]]


@dataclass(slots=True)
class Locked:
    counters: dict[TenantKey, tuple[int, int, bool]]  # used, reserved, empty when locked
    wallets: dict[str, tuple[int, int]]  # balance, held — of the wallets that exist
    # grants that still count (live ones, and those past their expiry not yet expired), in
    # the order they pay (rules/wallet.py)
    grants: dict[str, list[LiveGrant]]


@dataclass(slots=True)
class Reads:
    contexts: dict[str, TenantContext]  # of the tenants that exist
    prices: dict[tuple[str, str], ModelPrice]  # in effect, of the models that have one
    taken: dict[tuple[str, str], StoredKey]  # live request_ids among the asked ones
    locked: Locked  # the rows locked with the reads, when asked


class BatchAborted(Exception):
    """The transaction was rolled back as a whole, for a reason its requests decided one at
    a time do not share: `race` (another transaction took one of its request_ids), `locked`
    (a row lock held elsewhere past the lock timeout), `refused` (the database refused a
    statement)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class QuotaSession(Protocol):
    def lock_reservations(
        self, wanted: Sequence[tuple[str, str]]
    ) -> Pending[dict[tuple[str, str], Reservation]]:
        """Lock the (tenant_id, reservation_id) reservations that exist."""
        ...

    def read(
        self,
        tenant_ids: Sequence[str],
        resources: Sequence[str] | None,
        models: Sequence[tuple[str, str]],
        keys: Sequence[tuple[str, str]],
        now: datetime,
        *,
        lock_counters: Sequence[TenantKey] = (),
        lock_wallets: Sequence[str] = (),
    ) -> Pending[Reads]:
        """The tenants' contexts (quotas of `resources`; None: of every resource), the price
        in effect of each (provider, model), which (tenant_id, request_id) are live — and,
        in the same statement, what lock() would lock for `lock_counters` and
        `lock_wallets` (the reads see the snapshot taken before any lock was waited for)."""
        ...

    def lapsed_reservations(
        self, tenant_ids: Sequence[str], now: datetime, *, lock: bool
    ) -> Pending[dict[str, list[Reservation]]]:
        """Active reservations past their expiry, by tenant; with `lock`, locked, skipping
        any another transaction holds (it is settling or releasing it)."""
        ...

    def lock(
        self, counters: Sequence[TenantKey], wallets: Sequence[str], now: datetime
    ) -> Pending[Locked]:
        """Create-if-missing and lock counter rows, then lock wallets and the grants that
        still count at `now` (past their expiry or not)."""
        ...

    def counters(self, keys: Sequence[TenantKey]) -> Pending[dict[TenantKey, tuple[int, int]]]:
        """Counter values without locking them; missing rows read as zero."""
        ...

    def write(self, changes: Changes, now: datetime, keys_expire_at: datetime) -> Pending[int]:
        """Apply the changes (to rows this transaction locked); the result is the number of
        request_ids taken. Raises BatchAborted('race') when another took one first."""
        ...

    def offers(
        self, wanted: Sequence[tuple[str, str | None]]
    ) -> Pending[dict[tuple[str, str | None], list[PlanOffer]]]:
        """Per (resource, current plan): the other active self-serve plans, cheapest first."""
        ...


class QuotaStore(Protocol):
    connections_lost: int  # transactions run again because their connection had died

    async def run(self, work: Work[T], *, lock_timeout_ms: int = 0, shared: bool = True) -> T:
        """Run `work` in one transaction and commit; again on a deadlock, a lost connection
        or statements the connection forgot. Raises Unavailable when the database cannot be
        reached, BatchAborted for the reasons it names, and whatever `work` raises.
        `lock_timeout_ms`: the longest a statement waits for a row lock (0: no limit);
        `shared`: on the shared pool (lone calls, reports, sweeps) rather than the
        connections kept for the coalescing lanes' batches."""
        ...

    async def lapsed_tenants(
        self, now: datetime, limit: int, tenant_ids: Sequence[str] | None = None
    ) -> list[str]:
        """Tenants with a reservation or a grant past its expiry that still counts."""
        ...

    async def delete_expired_keys(self, now: datetime, limit: int) -> int:
        """Forget up to `limit` request_ids past their expiry; returns how many."""
        ...
