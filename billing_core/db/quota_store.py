"""SQL of the quota engine: every statement filters by tenant_id first.

Lock order (the same everywhere, so concurrent requests never deadlock):
idempotency key → reservation rows (by id) → usage counters (by resource, period,
window_start) → wallet row → wallet grants (by expiry).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import orjson
from psycopg import AsyncConnection
from psycopg.types.json import Jsonb

from billing_core.errors import NotFound
from billing_core.limits import Access, Quota, SubscriptionStatus
from billing_core.periods import tenant_zone
from billing_core.pricing import ModelPrice, missing_price
from billing_core.resources import PERIOD_ORDER, Overage, Period
from billing_core.wallet import LiveGrant, allocate_debit

Conn = AsyncConnection[Any]
CounterKey = tuple[str, Period, datetime]  # resource, period, window_start


@dataclass(frozen=True, slots=True)
class TenantContext:
    tenant_id: str
    timezone: str
    anchor: datetime
    plan_id: str | None
    access: Access
    trial_end: datetime | None
    unlimited: bool
    enterprise: bool
    wallet_live_micros: int
    quotas: Mapping[str, tuple[Quota, ...]]
    # whether any reservation is past its expiry but still counted (then it is released)
    has_expired_reservations: bool = True
    # whether a wallet grant reached its expiry and still counts (then it is expired)
    has_due_grants: bool = True


# One round trip: the tenant, its current subscription and plan, the live wallet, the
# quotas (overrides first: they win over the plan's quota of the same resource and period)
# and whether expired reservations wait to be released. The two flags are scalar subqueries,
# not EXISTS: PostgreSQL 18 may plan an EXISTS as a hashed subplan that reads the whole table.
# The subscription and the plan are LATERAL subqueries with LIMIT 1 (each is unique), so
# they are always looked up per tenant: as plain joins, a generic plan made while the
# tables were small hashed the tenants and read every current subscription, each time
# (tests/integration/test_batch_plans.py).
CONTEXT_SQL = """
SELECT t.tenant_id, t.timezone, t.created_at, s.plan_id, s.status, s.trial_end, s.past_due_since,
       s.billing_cycle_anchor, coalesce(p.unlimited, false) AS unlimited,
       coalesce(p.enterprise, false) AS enterprise,
       (SELECT coalesce(sum(g.remaining_micros), 0)::bigint FROM wallet_grants g
         WHERE g.tenant_id = t.tenant_id AND NOT g.expired
           AND (g.expires_at IS NULL OR g.expires_at > %(now)s)) AS wallet_live_micros,
       (SELECT coalesce(json_agg(json_build_array(q.resource, q.period, q."limit", q.warn_at,
                                                  q.overage) ORDER BY q.o DESC), '[]'::json)
          FROM (SELECT resource, period, "limit", warn_at, overage, true AS o
                  FROM quota_overrides o
                 WHERE o.tenant_id = t.tenant_id AND coalesce(p.enterprise, false)
                   AND (%(resources)s::text[] IS NULL OR resource = ANY(%(resources)s))
                UNION ALL
                SELECT resource, period, "limit", warn_at, overage, false
                  FROM plan_quotas pq
                 WHERE pq.plan_id = s.plan_id
                   AND (%(resources)s::text[] IS NULL OR resource = ANY(%(resources)s))) q)
         AS quotas,
       coalesce((SELECT true FROM reservations r
                  WHERE r.tenant_id = t.tenant_id AND r.status = 'active'
                    AND r.expires_at <= %(now)s LIMIT 1), false) AS has_expired_reservations,
       coalesce((SELECT true FROM wallet_grants g
                  WHERE g.tenant_id = t.tenant_id AND NOT g.expired
                    AND g.expires_at <= %(now)s LIMIT 1), false) AS has_due_grants
FROM tenants t
LEFT JOIN LATERAL (SELECT * FROM subscriptions s
                    WHERE s.tenant_id = t.tenant_id AND s.is_current LIMIT 1) s ON true
LEFT JOIN LATERAL (SELECT * FROM plans p WHERE p.plan_id = s.plan_id LIMIT 1) p ON true
WHERE t.tenant_id = ANY(%(tenants)s::text[])
"""
CONTEXT_COLUMNS = (
    "tenant_id", "timezone", "created_at", "plan_id", "status", "trial_end", "past_due_since",
    "billing_cycle_anchor", "unlimited", "enterprise", "wallet_live_micros", "quotas",
    "has_expired_reservations", "has_due_grants",
)  # fmt: skip
CONTEXT_TIMESTAMPS = (2, 5, 6, 7)  # positions of the timestamptz columns


async def load_context(
    conn: Conn, tenant_id: str, resource: str | None, now: datetime
) -> TenantContext:
    found = await load_contexts(conn, [tenant_id], None if resource is None else [resource], now)
    if tenant_id not in found:
        raise NotFound(f"unknown tenant {tenant_id!r}")
    return found[tenant_id]


async def load_contexts(
    conn: Conn, tenant_ids: Sequence[str], resources: Sequence[str] | None, now: datetime
) -> dict[str, TenantContext]:
    """The contexts of the tenants that exist, with quotas of `resources` (None: all)."""
    cur = await conn.execute(
        CONTEXT_SQL,
        {
            "tenants": list(tenant_ids),
            "now": now,
            "resources": None if resources is None else list(resources),
        },
    )
    return {row[0]: context_from_row(row) for row in await cur.fetchall()}


def context_from_row(row: Sequence[Any]) -> TenantContext:
    tenant_id, tz, created_at, plan_id, status, trial_end, past_due_since, anchor = row[:8]
    unlimited, ent, live, quota_rows, has_expired, has_due = row[8:]
    quotas: dict[str, dict[Period, Quota]] = {}
    # overrides come first and win over the plan's quota of the same (resource, period)
    for res, period, limit, warn_at, overage in quota_rows:
        quotas.setdefault(res, {}).setdefault(
            Period(period), Quota(res, Period(period), limit, tuple(warn_at), Overage(overage))
        )
    tenant_zone(tz)  # fail loudly on a bad stored timezone
    return TenantContext(
        tenant_id=tenant_id,
        timezone=tz,
        anchor=anchor or created_at,
        plan_id=plan_id,
        access=Access(SubscriptionStatus(status) if status else None, trial_end, past_due_since),
        trial_end=trial_end,
        unlimited=unlimited,
        enterprise=ent,
        wallet_live_micros=live,
        has_expired_reservations=has_expired,
        has_due_grants=has_due,
        quotas={
            res: tuple(sorted(by_period.values(), key=lambda q: PERIOD_ORDER[q.period]))
            for res, by_period in quotas.items()
        },
    )


# --- idempotency -----------------------------------------------------------------------


# An idempotency key is taken over only once it has expired; a live one stays its owner's.
CLAIM_UNLESS_LIVE = """
ON CONFLICT (tenant_id, request_id) DO UPDATE
   SET operation = EXCLUDED.operation, request_hash = EXCLUDED.request_hash,
       response = EXCLUDED.response, created_at = EXCLUDED.created_at,
       expires_at = EXCLUDED.expires_at
 WHERE k.expires_at <= EXCLUDED.created_at
"""


async def claim_request_id(
    conn: Conn,
    tenant_id: str,
    request_id: str,
    operation: str,
    request_hash: str,
    now: datetime,
    expires_at: datetime,
) -> bool:
    """Take the request_id for this transaction; False when a live earlier one holds it.

    A concurrent twin blocks here until the first commits (then sees it) or rolls back
    (then takes it), so one request_id is never counted twice.
    """
    cur = await conn.execute(
        """
        INSERT INTO idempotency_keys AS k
            (tenant_id, request_id, operation, request_hash, response, created_at, expires_at)
        VALUES (%s, %s, %s, %s, '{}'::jsonb, %s, %s)
        """
        + CLAIM_UNLESS_LIVE
        + " RETURNING 1",
        (tenant_id, request_id, operation, request_hash, now, expires_at),
    )
    return await cur.fetchone() is not None


async def read_request_id(
    conn: Conn, tenant_id: str, request_id: str
) -> tuple[str, str, dict[str, Any]]:
    cur = await conn.execute(
        "SELECT operation, request_hash, response FROM idempotency_keys"
        " WHERE tenant_id = %s AND request_id = %s",
        (tenant_id, request_id),
    )
    row = await cur.fetchone()
    if row is None:  # pragma: no cover - claim_request_id just saw it
        raise NotFound(f"request_id {request_id!r} vanished")
    return row[0], row[1], row[2]


async def store_response(
    conn: Conn, tenant_id: str, request_id: str, response: Mapping[str, Any]
) -> None:
    await conn.execute(
        "UPDATE idempotency_keys SET response = %s WHERE tenant_id = %s AND request_id = %s",
        (Jsonb(dict(response)), tenant_id, request_id),
    )


# --- reservations ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReservationRow:
    reservation_id: str
    request_id: str
    resource: str
    amount: int
    windows: tuple[CounterKey, ...]
    held_micros: int
    status: str
    expires_at: datetime
    commit_response: dict[str, Any] | None


_RESERVATION_COLUMNS = (
    "reservation_id, request_id, resource, amount, windows, held_micros, status,"
    " expires_at, commit_response"
)


def reservation_windows(windows: Iterable[CounterKey]) -> list[dict[str, str]]:
    """A reservation's counter windows as its `windows` column holds them."""
    return [{"period": p.value, "window_start": start.isoformat()} for _, p, start in windows]


def reservation_from_row(row: Sequence[Any]) -> ReservationRow:
    rid, request_id, resource, amount, windows, held, status, expires_at, response = row
    return ReservationRow(
        rid,
        request_id,
        resource,
        amount,
        tuple(
            (resource, Period(w["period"]), datetime.fromisoformat(w["window_start"]))
            for w in windows
        ),
        held,
        status,
        expires_at,
        response,
    )


async def lock_reservation(conn: Conn, tenant_id: str, reservation_id: str) -> ReservationRow:
    cur = await conn.execute(
        f"SELECT {_RESERVATION_COLUMNS} FROM reservations"
        " WHERE tenant_id = %s AND reservation_id = %s FOR UPDATE",
        (tenant_id, reservation_id),
    )
    row = await cur.fetchone()
    if row is None:
        raise unknown_reservation(tenant_id, reservation_id)
    return reservation_from_row(row)


def unknown_reservation(tenant_id: str, reservation_id: str) -> NotFound:
    return NotFound(f"unknown reservation {reservation_id!r} for tenant {tenant_id!r}")


async def expired_reservations(
    conn: Conn, tenant_id: str, resource: str | None, now: datetime, *, lock: bool
) -> list[ReservationRow]:
    """Reservations past their expiry that still count as used; locked when `lock`."""
    cur = await conn.execute(
        f"SELECT {_RESERVATION_COLUMNS} FROM reservations"
        " WHERE tenant_id = %s AND (%s::text IS NULL OR resource = %s)"
        " AND status = 'active' AND expires_at <= %s"
        " ORDER BY reservation_id" + (" FOR UPDATE" if lock else ""),
        (tenant_id, resource, resource, now),
    )
    return [reservation_from_row(r) for r in await cur.fetchall()]


async def finish_reservations(
    conn: Conn,
    tenant_id: str,
    reservation_ids: Sequence[str],
    status: str,
    now: datetime,
    usage_record_id: str | None = None,
    commit_response: Mapping[str, Any] | None = None,
) -> None:
    await conn.execute(
        "UPDATE reservations SET status = %s, finished_at = %s, usage_record_id = %s,"
        " commit_response = %s WHERE tenant_id = %s AND reservation_id = ANY(%s)",
        (
            status,
            now,
            usage_record_id,
            None if commit_response is None else Jsonb(dict(commit_response)),
            tenant_id,
            list(reservation_ids),
        ),
    )


async def insert_reservation(
    conn: Conn,
    tenant_id: str,
    reservation_id: str,
    request_id: str,
    resource: str,
    amount: int,
    windows: Sequence[CounterKey],
    held_micros: int,
    labels: Mapping[str, str],
    now: datetime,
    expires_at: datetime,
) -> None:
    await conn.execute(
        "INSERT INTO reservations (tenant_id, reservation_id, request_id, resource, amount,"
        " windows, held_micros, labels, expires_at, created_at)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (
            tenant_id,
            reservation_id,
            request_id,
            resource,
            amount,
            Jsonb(reservation_windows(windows)),
            held_micros,
            Jsonb(dict(labels)),
            expires_at,
            now,
        ),
    )


async def expired_reservation_ids(
    conn: Conn, now: datetime, limit: int, tenant_ids: Sequence[str] | None = None
) -> list[tuple[str, str]]:
    """Up to `limit` reservations past their expiry that still count, oldest first (of
    `tenant_ids` only, when given)."""
    cur = await conn.execute(
        "SELECT tenant_id, reservation_id FROM reservations"
        " WHERE status = 'active' AND expires_at <= %s"
        " AND (%s::text[] IS NULL OR tenant_id = ANY(%s::text[]))"
        " ORDER BY expires_at LIMIT %s",
        (now, tenant_ids, tenant_ids, limit),
    )
    return [(r[0], r[1]) for r in await cur.fetchall()]


async def due_grant_tenants(
    conn: Conn, now: datetime, limit: int, tenant_ids: Sequence[str] | None = None
) -> list[str]:
    """Up to `limit` tenants with a grant past its expiry that is not marked expired yet (of
    `tenant_ids` only, when given)."""
    cur = await conn.execute(
        "SELECT DISTINCT tenant_id FROM wallet_grants"
        " WHERE NOT expired AND expires_at <= %s"
        " AND (%s::text[] IS NULL OR tenant_id = ANY(%s::text[]))"
        " ORDER BY tenant_id LIMIT %s",
        (now, tenant_ids, tenant_ids, limit),
    )
    return [r[0] for r in await cur.fetchall()]


async def delete_expired_request_ids(conn: Conn, now: datetime, limit: int) -> int:
    """Forget up to `limit` idempotency keys past their expiry, oldest first. An expired key
    already counts as absent everywhere (a new request with its request_id takes it over),
    so forgetting it changes no answer. Keys another transaction holds are skipped (SKIP
    LOCKED): it is taking one over, or another sweeper is deleting it."""
    cur = await conn.execute(
        "WITH gone AS (DELETE FROM idempotency_keys WHERE ctid = ANY(ARRAY("
        " SELECT ctid FROM idempotency_keys WHERE expires_at <= %s"
        " ORDER BY expires_at LIMIT %s FOR UPDATE SKIP LOCKED)) RETURNING 1)"
        " SELECT count(*) FROM gone",
        (now, limit),
    )
    row = await cur.fetchone()
    return int(row[0]) if row else 0


# --- counters --------------------------------------------------------------------------


def _sorted_keys(keys: Iterable[CounterKey]) -> list[CounterKey]:
    return sorted(set(keys), key=lambda k: (k[0], PERIOD_ORDER[k[1]], k[2]))


async def lock_counters(
    conn: Conn, tenant_id: str, keys: Iterable[CounterKey]
) -> dict[CounterKey, tuple[int, int]]:
    """Create-if-missing and lock counter rows in the global order; (used, reserved) each."""
    ordered = _sorted_keys(keys)
    if not ordered:
        return {}
    cur = await conn.execute(
        """
        INSERT INTO usage_counters AS c (tenant_id, resource, period, window_start)
        SELECT %s, r, p, w FROM unnest(%s::text[], %s::text[], %s::timestamptz[]) AS u(r, p, w)
        ON CONFLICT (tenant_id, resource, period, window_start)
        DO UPDATE SET used = c.used
        RETURNING resource, period, window_start, used, reserved
        """,
        (
            tenant_id,
            [k[0] for k in ordered],
            [k[1].value for k in ordered],
            [k[2] for k in ordered],
        ),
    )
    return {(r[0], Period(r[1]), r[2]): (r[3], r[4]) for r in await cur.fetchall()}


async def read_counters(
    conn: Conn, tenant_id: str, keys: Iterable[CounterKey]
) -> dict[CounterKey, tuple[int, int]]:
    """Counter values without locking (reports, dry runs); missing rows read as zero."""
    ordered = _sorted_keys(keys)
    found: dict[CounterKey, tuple[int, int]] = dict.fromkeys(ordered, (0, 0))
    if not ordered:
        return found
    cur = await conn.execute(
        """
        SELECT c.resource, c.period, c.window_start, c.used, c.reserved
        FROM unnest(%s::text[], %s::text[], %s::timestamptz[]) AS u(r, p, w)
        JOIN usage_counters c ON c.tenant_id = %s AND c.resource = u.r
         AND c.period = u.p AND c.window_start = u.w
        """,
        (
            [k[0] for k in ordered],
            [k[1].value for k in ordered],
            [k[2] for k in ordered],
            tenant_id,
        ),
    )
    for r in await cur.fetchall():
        found[(r[0], Period(r[1]), r[2])] = (r[3], r[4])
    return found


async def add_to_counters(
    conn: Conn, tenant_id: str, deltas: Mapping[CounterKey, tuple[int, int]]
) -> None:
    """Add (used, reserved) deltas to counter rows this transaction has locked."""
    keys = [k for k, d in deltas.items() if d != (0, 0)]
    if not keys:
        return
    await conn.execute(
        """
        UPDATE usage_counters c SET used = c.used + u.du, reserved = c.reserved + u.dr
        FROM unnest(%s::text[], %s::text[], %s::timestamptz[], %s::bigint[], %s::bigint[])
             AS u(r, p, w, du, dr)
        WHERE c.tenant_id = %s AND c.resource = u.r AND c.period = u.p AND c.window_start = u.w
        """,
        (
            [k[0] for k in keys],
            [k[1].value for k in keys],
            [k[2] for k in keys],
            [deltas[k][0] for k in keys],
            [deltas[k][1] for k in keys],
            tenant_id,
        ),
    )


# --- usage records, notifications, prices ---------------------------------------------


class UsageRecordRow(NamedTuple):  # a row: a tuple is built several times faster
    usage_record_id: str
    resource: str
    amount: int
    kind: str
    request_id: str | None
    reservation_id: str | None
    plan_id: str | None
    provider: str | None
    model: str | None
    input_tokens: int
    output_tokens: int
    cost_micros: int
    wallet_charged_micros: int
    over_limit: bool
    labels: Mapping[str, str]
    occurred_at: datetime


async def insert_usage_record(conn: Conn, tenant_id: str, rec: UsageRecordRow) -> None:
    await conn.execute(
        "INSERT INTO usage_records (tenant_id, usage_record_id, resource, amount, kind,"
        " request_id, reservation_id, plan_id, provider, model, input_tokens, output_tokens,"
        " cost_micros, wallet_charged_micros, over_limit, labels, occurred_at)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (
            tenant_id,
            rec.usage_record_id,
            rec.resource,
            rec.amount,
            rec.kind,
            rec.request_id,
            rec.reservation_id,
            rec.plan_id,
            rec.provider,
            rec.model,
            rec.input_tokens,
            rec.output_tokens,
            rec.cost_micros,
            rec.wallet_charged_micros,
            rec.over_limit,
            Jsonb(dict(rec.labels)),
            rec.occurred_at,
        ),
    )


async def insert_notifications(
    conn: Conn, tenant_id: str, rows: Sequence[tuple[str, str, str, dict[str, Any]]], now: datetime
) -> None:
    """(kind, dedupe_key, message, details) each; a dedupe_key is recorded once."""
    for kind, key, message, details in rows:
        await conn.execute(
            "INSERT INTO notifications (tenant_id, kind, dedupe_key, message, details, created_at)"
            " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (tenant_id, dedupe_key) DO NOTHING",
            (tenant_id, kind, key, message, Jsonb(details), now),
        )


async def price_at(conn: Conn, provider: str, model: str, at: datetime) -> ModelPrice:
    cur = await conn.execute(
        "SELECT effective_from, input_micros_per_million, output_micros_per_million"
        " FROM model_prices WHERE provider = %s AND model = %s AND effective_from <= %s"
        " ORDER BY effective_from DESC LIMIT 1",
        (provider, model, at),
    )
    row = await cur.fetchone()
    if row is None:
        raise missing_price(provider, model, at)
    return ModelPrice(provider, model, row[0], row[1], row[2])


@dataclass(frozen=True, slots=True)
class PlanOffer:
    plan_id: str
    unlimited: bool
    quotas: tuple[Quota, ...]


async def plan_offers(conn: Conn, resource: str, exclude_plan: str | None) -> list[PlanOffer]:
    """Active, self-serve plans cheapest first, with their quotas of `resource`."""
    return await (await send_plan_offers(conn, resource, exclude_plan))()


# Active, self-serve plans cheapest first, with their quotas of a resource, as JSON text
# (one statement for the psycopg path and the batch's Wire, db/wire.py).
PLAN_OFFERS_SQL = """
SELECT coalesce(json_agg(json_build_array(p.plan_id, p.unlimited, q.period, q."limit",
                                          q.warn_at, q.overage)
                         ORDER BY p.price_cents, p.priority DESC, p.plan_id, q.period), '[]')::text
FROM plans p LEFT JOIN plan_quotas q ON q.plan_id = p.plan_id AND q.resource = %(resource)s::text
WHERE p.active AND NOT p.enterprise AND p.plan_id IS DISTINCT FROM %(exclude)s::text
"""


def offers_from_json(resource: str, text: bytes | str) -> list[PlanOffer]:
    offers: dict[str, PlanOffer] = {}
    for plan_id, unlimited, period, limit, warn_at, overage in orjson.loads(text):
        offer = offers.setdefault(plan_id, PlanOffer(plan_id, unlimited, ()))
        if period is not None:
            quota = Quota(resource, Period(period), limit, tuple(warn_at), Overage(overage))
            offers[plan_id] = PlanOffer(plan_id, unlimited, (*offer.quotas, quota))
    return list(offers.values())


async def send_plan_offers(
    conn: Conn, resource: str, exclude_plan: str | None
) -> Callable[[], Awaitable[list[PlanOffer]]]:
    """plan_offers in two steps: the statement joins the pipeline now, the result is
    fetched when the returned function is awaited."""
    cur = await conn.execute(PLAN_OFFERS_SQL, {"resource": resource, "exclude": exclude_plan})

    async def result() -> list[PlanOffer]:
        row = await cur.fetchone()
        return offers_from_json(resource, row[0] if row else "[]")

    return result


# --- wallet ----------------------------------------------------------------------------


async def lock_wallet(
    conn: Conn, tenant_id: str, now: datetime, *, expire_due: bool = True
) -> tuple[int, int]:
    """Lock the tenant's wallet and expire due grants (skipped when the caller knows, as of
    the same `now`, that none is due); returns (balance, held) micros."""
    cur = await conn.execute(
        "INSERT INTO wallets AS w (tenant_id, updated_at) VALUES (%s, %s)"
        " ON CONFLICT (tenant_id) DO UPDATE SET updated_at = w.updated_at"
        " RETURNING balance_micros, held_micros",
        (tenant_id, now),
    )
    row = await cur.fetchone()
    assert row is not None
    balance, held = int(row[0]), int(row[1])
    if expire_due:
        balance, _ = await _expire_due_grants(conn, tenant_id, balance, held, now)
    return balance, held


async def expire_due_grants(conn: Conn, tenant_id: str, now: datetime) -> int:
    """Lock the tenant's wallet and expire its grants past their expiry (what lock_wallet
    does on the way); returns how many were expired."""
    balance, held = await lock_wallet(conn, tenant_id, now, expire_due=False)
    _, count = await _expire_due_grants(conn, tenant_id, balance, held, now)
    return count


async def _expire_due_grants(
    conn: Conn, tenant_id: str, balance: int, held: int, now: datetime
) -> tuple[int, int]:
    """Under the wallet's lock: grants past their expiry stop paying, what they had left
    leaves the balance with a ledger entry. Returns the new balance and how many expired."""
    cur = await conn.execute(
        """
        UPDATE wallet_grants g SET expired = true, remaining_micros = 0
        FROM (SELECT grant_id, remaining_micros FROM wallet_grants
              WHERE tenant_id = %(t)s AND NOT expired AND expires_at <= %(now)s
              ORDER BY grant_id FOR UPDATE) o
        WHERE g.tenant_id = %(t)s AND g.grant_id = o.grant_id
        RETURNING g.grant_id, o.remaining_micros
        """,
        {"t": tenant_id, "now": now},
    )
    rows = await cur.fetchall()
    expired = [(r[0], int(r[1])) for r in rows if r[1] > 0]
    if expired:
        await _ledger(
            conn, tenant_id, [(g, "expire", -m, None, "grant expired") for g, m in expired], now
        )
        balance -= sum(m for _, m in expired)
        await _set_wallet(conn, tenant_id, balance, held, now)
    return balance, len(rows)


async def _set_wallet(conn: Conn, tenant_id: str, balance: int, held: int, now: datetime) -> None:
    await conn.execute(
        "UPDATE wallets SET balance_micros = %s, held_micros = %s, updated_at = %s"
        " WHERE tenant_id = %s",
        (balance, held, now, tenant_id),
    )


async def _ledger(
    conn: Conn,
    tenant_id: str,
    entries: Sequence[tuple[str, str, int, str | None, str]],
    now: datetime,
) -> None:
    await conn.execute(
        """
        INSERT INTO wallet_ledger (tenant_id, grant_id, kind, delta_micros, usage_record_id,
                                   reason, created_at)
        SELECT %s, g, k, d, u, r, %s
        FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::text[], %s::text[])
             AS e(g, k, d, u, r)
        """,
        (
            tenant_id,
            now,
            [e[0] for e in entries],
            [e[1] for e in entries],
            [e[2] for e in entries],
            [e[3] for e in entries],
            [e[4] for e in entries],
        ),
    )


async def change_wallet(
    conn: Conn,
    tenant_id: str,
    balance: int,
    held: int,
    *,
    debit_micros: int = 0,
    hold_delta_micros: int = 0,
    usage_record_id: str | None = None,
    now: datetime,
) -> int:
    """Debit (soonest-expiring grants first) and/or move the hold of a locked wallet.

    Returns the new balance. The caller has checked the debit fits the balance.
    """
    if debit_micros:
        cur = await conn.execute(
            "SELECT grant_id, remaining_micros, expires_at FROM wallet_grants"
            " WHERE tenant_id = %s AND NOT expired AND remaining_micros > 0"
            " ORDER BY expires_at NULLS LAST, created_at, grant_id FOR UPDATE",
            (tenant_id,),
        )
        grants = [LiveGrant(r[0], int(r[1]), r[2]) for r in await cur.fetchall()]
        taken = allocate_debit(grants, debit_micros)
        await conn.execute(
            "UPDATE wallet_grants g SET remaining_micros = g.remaining_micros - u.m"
            " FROM unnest(%s::text[], %s::bigint[]) AS u(id, m)"
            " WHERE g.tenant_id = %s AND g.grant_id = u.id",
            ([t[0] for t in taken], [t[1] for t in taken], tenant_id),
        )
        await _ledger(
            conn, tenant_id, [(g, "debit", -m, usage_record_id, "usage") for g, m in taken], now
        )
        balance -= debit_micros
    await _set_wallet(conn, tenant_id, balance, held + hold_delta_micros, now)
    return balance


async def add_grant(
    conn: Conn,
    tenant_id: str,
    *,
    grant_id: str,
    grant_key: str,
    source: str,
    amount_micros: int,
    expires_at: datetime | None,
    reason: str,
    now: datetime,
) -> bool:
    """Credit a grant once per grant_key; False when that key was granted before."""
    balance, held = await lock_wallet(conn, tenant_id, now)
    cur = await conn.execute(
        "INSERT INTO wallet_grants (tenant_id, grant_id, grant_key, source, amount_micros,"
        " remaining_micros, expires_at, reason, created_at)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (tenant_id, grant_key) DO NOTHING RETURNING 1",
        (
            tenant_id,
            grant_id,
            grant_key,
            source,
            amount_micros,
            amount_micros,
            expires_at,
            reason,
            now,
        ),
    )
    if await cur.fetchone() is None:
        return False
    await _ledger(conn, tenant_id, [(grant_id, "grant", amount_micros, None, reason)], now)
    await _set_wallet(conn, tenant_id, balance + amount_micros, held, now)
    return True
