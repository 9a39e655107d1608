"""Set-based SQL for deciding a batch of CheckAndConsume requests in one transaction.

Every statement covers all tenants of the batch at once. Reads come in two steps — `send_*`
puts the statement into the connection's pipeline and returns a `Pending` that fetches
its result — so several reads share one round trip. Lock order is the one of
quota_store (counters → wallet row → grants), by tenant first.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from billing_core.db.quota_store import (
    CLAIM_UNLESS_LIVE,
    CONTEXT_SQL,
    Conn,
    PlanOffer,
    TenantContext,
    UsageRecordRow,
    context_from_row,
    send_plan_offers,
)
from billing_core.pricing import ModelPrice
from billing_core.resources import PERIOD_ORDER, Period
from billing_core.wallet import LiveGrant

T = TypeVar("T")
Pending = Callable[[], Awaitable[T]]
TenantKey = tuple[str, str, Period, datetime]  # tenant, resource, period, window_start
StoredKey = tuple[str, str, dict[str, Any]]  # operation, request_hash, response


async def send_contexts(
    conn: Conn, tenant_ids: Sequence[str], resources: Sequence[str], now: datetime
) -> Pending[dict[str, TenantContext]]:
    cur = await conn.execute(
        CONTEXT_SQL, {"tenants": list(tenant_ids), "now": now, "resources": list(resources)}
    )

    async def result() -> dict[str, TenantContext]:
        return {row[0]: context_from_row(row) for row in await cur.fetchall()}

    return result


async def send_prices(
    conn: Conn, models: Sequence[tuple[str, str]], now: datetime
) -> Pending[dict[tuple[str, str], ModelPrice]]:
    """The price in effect at `now` of each (provider, model) that has one."""
    cur = await conn.execute(
        """
        SELECT DISTINCT ON (m.provider, m.model) m.provider, m.model, m.effective_from,
               m.input_micros_per_million, m.output_micros_per_million
        FROM model_prices m
        JOIN unnest(%s::text[], %s::text[]) AS u(p, mo) ON m.provider = u.p AND m.model = u.mo
        WHERE m.provider = ANY(%s) AND m.model = ANY(%s) AND m.effective_from <= %s
        ORDER BY m.provider, m.model, m.effective_from DESC
        """,
        (
            [m[0] for m in models],
            [m[1] for m in models],
            [m[0] for m in models],
            [m[1] for m in models],
            now,
        ),
    )

    async def result() -> dict[tuple[str, str], ModelPrice]:
        return {(r[0], r[1]): ModelPrice(*r) for r in await cur.fetchall()}

    return result


async def send_live_keys(
    conn: Conn, keys: Sequence[tuple[str, str]], now: datetime
) -> Pending[dict[tuple[str, str], StoredKey]]:
    """Idempotency keys still live at `now` among (tenant_id, request_id) pairs."""
    # both primary-key columns as arrays: always an index scan, whatever the table's size
    # (a join against a JSON or array parameter can be planned as a full scan); the
    # cross product it may return is narrowed to the wanted pairs here
    cur = await conn.execute(
        "SELECT tenant_id, request_id, operation, request_hash, response FROM idempotency_keys"
        " WHERE tenant_id = ANY(%s) AND request_id = ANY(%s) AND expires_at > %s",
        (sorted({k[0] for k in keys}), sorted({k[1] for k in keys}), now),
    )
    wanted = set(keys)

    async def result() -> dict[tuple[str, str], StoredKey]:
        rows = await cur.fetchall()
        return {(r[0], r[1]): (r[2], r[3], r[4]) for r in rows if (r[0], r[1]) in wanted}

    return result


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _key_json(key: TenantKey) -> list[str]:
    return [key[0], key[1], key[2].value, key[3].isoformat()]


def _keys_json(keys: Sequence[TenantKey]) -> str:
    return _json([_key_json(k) for k in keys])


def _record_json(tenant_id: str, r: UsageRecordRow) -> list[Any]:
    return [tenant_id, r.usage_record_id, r.resource, r.amount, r.kind, r.request_id,
            r.reservation_id, r.plan_id, r.provider, r.model, r.input_tokens, r.output_tokens,
            r.cost_micros, r.wallet_charged_micros, r.over_limit, dict(r.labels)]  # fmt: skip


def _order(key: TenantKey) -> tuple[str, str, int, datetime]:
    return key[0], key[1], PERIOD_ORDER[key[2]], key[3]


async def send_lock_counters(
    conn: Conn, keys: Sequence[TenantKey]
) -> Pending[dict[TenantKey, tuple[int, int, bool]]]:
    """Create-if-missing and lock counter rows in the global order;
    (used, reserved, created by this statement) each."""
    ordered = sorted(set(keys), key=_order)
    cur = await conn.execute(
        """
        INSERT INTO usage_counters AS c (tenant_id, resource, period, window_start)
        SELECT e->>0, e->>1, e->>2, (e->>3)::timestamptz
        FROM jsonb_array_elements(%s::jsonb) WITH ORDINALITY AS u(e, n)
        ORDER BY n
        ON CONFLICT (tenant_id, resource, period, window_start)
        DO UPDATE SET used = c.used
        RETURNING tenant_id, resource, period, window_start, used, reserved, xmax = 0
        """,
        (_keys_json(ordered),),
    )

    async def result() -> dict[TenantKey, tuple[int, int, bool]]:
        return {(r[0], r[1], Period(r[2]), r[3]): (r[4], r[5], r[6]) for r in await cur.fetchall()}

    return result


async def send_lock_wallets(
    conn: Conn, tenant_ids: Sequence[str]
) -> Pending[tuple[dict[str, tuple[int, int]], dict[str, list[LiveGrant]]]]:
    """Lock the wallets that exist (a missing wallet is an empty one: it pays nothing, so it
    is never written) and their live grants, soonest-expiring first."""
    tenants = sorted(set(tenant_ids))
    wallets = await conn.execute(
        "SELECT tenant_id, balance_micros, held_micros FROM wallets"
        " WHERE tenant_id = ANY(%s) ORDER BY tenant_id FOR UPDATE",
        (tenants,),
    )
    grants = await conn.execute(
        "SELECT tenant_id, grant_id, remaining_micros, expires_at FROM wallet_grants"
        " WHERE tenant_id = ANY(%s) AND NOT expired AND remaining_micros > 0"
        " ORDER BY tenant_id, expires_at NULLS LAST, created_at, grant_id FOR UPDATE",
        (tenants,),
    )

    async def result() -> tuple[dict[str, tuple[int, int]], dict[str, list[LiveGrant]]]:
        found = {r[0]: (int(r[1]), int(r[2])) for r in await wallets.fetchall()}
        live: dict[str, list[LiveGrant]] = {}
        for r in await grants.fetchall():
            live.setdefault(r[0], []).append(LiveGrant(r[1], int(r[2]), r[3]))
        return found, live

    return result


# --- writes ------------------------------------------------------------------------------


@dataclass(slots=True)
class BatchWrites:
    """Everything a batch writes, applied by one statement (send_writes)."""

    deltas: dict[TenantKey, tuple[int, int]] = field(default_factory=dict)
    dropped: list[TenantKey] = field(default_factory=list)  # created, then nothing used them
    records: list[tuple[str, UsageRecordRow]] = field(default_factory=list)
    debits: list[tuple[str, str, int]] = field(default_factory=list)  # tenant, grant, micros
    # tenant, grant, kind, delta_micros, usage_record_id, reason — in order
    ledger: list[tuple[str, str, str, int, str | None, str]] = field(default_factory=list)
    wallets: dict[str, tuple[int, int]] = field(default_factory=dict)  # balance, held
    # tenant, kind, dedupe_key, message, details — the first of a key wins
    notes: list[tuple[str, str, str, str, dict[str, Any]]] = field(default_factory=list)
    # tenant, request_id, operation, request_hash, response
    claims: list[tuple[str, str, str, str, dict[str, Any]]] = field(default_factory=list)


# One statement of data-modifying CTEs (each part gets '[]' when it has nothing to do).
# They touch disjoint rows, so running them in one snapshot is the same as one by one.
# Every part finds its rows through a primary key with array conditions (or ON CONFLICT),
# so no part can be planned as a full scan of a big table;
# when fewer idempotency keys could be taken than asked (another transaction took one
# first), quota_expect_claims fails the statement, which rolls the batch back.
_WRITES_SQL = f"""
WITH counters AS (
    INSERT INTO usage_counters AS c (tenant_id, resource, period, window_start, used, reserved)
    SELECT e->>0, e->>1, e->>2, (e->>3)::timestamptz, (e->>4)::bigint, (e->>5)::bigint
    FROM jsonb_array_elements(%(deltas)s::jsonb) WITH ORDINALITY AS u(e, n)
    ORDER BY n
    ON CONFLICT (tenant_id, resource, period, window_start)
    DO UPDATE SET used = c.used + EXCLUDED.used, reserved = c.reserved + EXCLUDED.reserved
), dropped AS (
    DELETE FROM usage_counters c
    USING jsonb_array_elements(%(dropped)s::jsonb) AS u(e)
    WHERE c.tenant_id = ANY(%(dropped_tenants)s) AND c.window_start = ANY(%(dropped_starts)s)
      AND c.tenant_id = u.e->>0 AND c.resource = u.e->>1 AND c.period = u.e->>2
      AND c.window_start = (u.e->>3)::timestamptz AND c.used = 0 AND c.reserved = 0
), records AS (
    INSERT INTO usage_records (tenant_id, usage_record_id, resource, amount, kind,
        request_id, reservation_id, plan_id, provider, model, input_tokens, output_tokens,
        cost_micros, wallet_charged_micros, over_limit, labels, occurred_at)
    SELECT e->>0, e->>1, e->>2, (e->>3)::bigint, e->>4, e->>5, e->>6, e->>7, e->>8, e->>9,
           (e->>10)::bigint, (e->>11)::bigint, (e->>12)::bigint, (e->>13)::bigint,
           (e->>14)::bool, e->15, %(now)s
    FROM jsonb_array_elements(%(records)s::jsonb) WITH ORDINALITY AS u(e, n)
    ORDER BY n
), grants AS (
    UPDATE wallet_grants g SET remaining_micros = g.remaining_micros - (u.e->>2)::bigint
    FROM jsonb_array_elements(%(debits)s::jsonb) AS u(e)
    WHERE g.tenant_id = ANY(%(debit_tenants)s) AND g.grant_id = ANY(%(debit_grants)s)
      AND g.tenant_id = u.e->>0 AND g.grant_id = u.e->>1
), ledger AS (
    INSERT INTO wallet_ledger (tenant_id, grant_id, kind, delta_micros, usage_record_id,
                               reason, created_at)
    SELECT e->>0, e->>1, e->>2, (e->>3)::bigint, e->>4, e->>5, %(now)s
    FROM jsonb_array_elements(%(ledger)s::jsonb) WITH ORDINALITY AS u(e, n)
    ORDER BY n
), wallets AS (
    UPDATE wallets w SET balance_micros = (u.e->>1)::bigint, held_micros = (u.e->>2)::bigint,
                         updated_at = %(now)s
    FROM jsonb_array_elements(%(wallets)s::jsonb) AS u(e)
    WHERE w.tenant_id = ANY(%(wallet_tenants)s) AND w.tenant_id = u.e->>0
), notes AS (
    INSERT INTO notifications (tenant_id, kind, dedupe_key, message, details, created_at)
    SELECT e->>0, e->>1, e->>2, e->>3, e->4, %(now)s
    FROM jsonb_array_elements(%(notes)s::jsonb) WITH ORDINALITY AS u(e, n)
    ORDER BY n
    ON CONFLICT (tenant_id, dedupe_key) DO NOTHING
), claims AS (
    INSERT INTO idempotency_keys AS k
        (tenant_id, request_id, operation, request_hash, response, created_at, expires_at)
    SELECT e->>0, e->>1, e->>2, e->>3, e->4, %(now)s, %(expires)s
    FROM jsonb_array_elements(%(claims)s::jsonb) AS u(e)
    {CLAIM_UNLESS_LIVE}
    RETURNING 1
)
SELECT quota_expect_claims(%(expected)s, (SELECT count(*) FROM claims))
"""

CLAIM_RACE_SQLSTATE = "QB001"  # raised by quota_expect_claims (migration 0004)


async def send_writes(
    conn: Conn, w: BatchWrites, now: datetime, expires_at: datetime
) -> Pending[int]:
    """Apply a batch's writes (rows locked by this transaction); the result is the number of
    idempotency keys taken, which is all of them or an error. All records of a batch occur
    at `now`."""
    deltas = sorted((k for k, d in w.deltas.items() if d != (0, 0)), key=_order)
    debits: dict[tuple[str, str], int] = {}
    for tenant_id, grant_id, micros in w.debits:
        debits[(tenant_id, grant_id)] = debits.get((tenant_id, grant_id), 0) + micros
    notes: dict[tuple[str, str], tuple[str, str, str, str, dict[str, Any]]] = {}
    for note in w.notes:
        notes.setdefault((note[0], note[2]), note)
    cur = await conn.execute(
        _WRITES_SQL,
        {
            "now": now,
            "expires": expires_at,
            "deltas": _json([[*_key_json(k), *w.deltas[k]] for k in deltas]),
            "dropped": _keys_json(w.dropped),
            "dropped_tenants": sorted({k[0] for k in w.dropped}),
            "dropped_starts": sorted({k[3] for k in w.dropped}),
            "debit_tenants": sorted({t for t, _ in debits}),
            "debit_grants": sorted({g for _, g in debits}),
            "wallet_tenants": sorted(w.wallets),
            "records": _json([_record_json(t, r) for t, r in w.records]),
            "debits": _json([[t, g, m] for (t, g), m in sorted(debits.items())]),
            "ledger": _json([list(e) for e in w.ledger]),
            "wallets": _json([[t, b, h] for t, (b, h) in sorted(w.wallets.items())]),
            "notes": _json([list(n) for n in notes.values()]),
            "claims": _json([list(c) for c in w.claims]),
            "expected": len(w.claims),
        },
    )

    async def result() -> int:
        row = await cur.fetchone()
        return int(row[0]) if row else 0

    return result


async def send_offers(
    conn: Conn, wanted: Sequence[tuple[str, str | None]]
) -> Pending[dict[tuple[str, str | None], list[PlanOffer]]]:
    """plan_offers for several (resource, current plan) pairs in one round trip."""
    pending = [(w, await send_plan_offers(conn, *w)) for w in wanted]

    async def result() -> dict[tuple[str, str | None], list[PlanOffer]]:
        return {w: await p() for w, p in pending}

    return result
