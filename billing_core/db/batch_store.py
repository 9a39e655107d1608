"""Set-based SQL for deciding a batch of CheckAndConsume requests in one transaction.

Every statement covers all tenants of the batch at once. Reads come in two steps — `send_*`
puts the statement into the connection's pipeline and returns a `Pending` that fetches
its result — so several reads share one round trip. Lock order is the one of
quota_store (counters → wallet row → grants), by tenant first.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

from billing_core.db.quota_store import (
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
        WHERE m.effective_from <= %s
        ORDER BY m.provider, m.model, m.effective_from DESC
        """,
        ([m[0] for m in models], [m[1] for m in models], now),
    )

    async def result() -> dict[tuple[str, str], ModelPrice]:
        return {(r[0], r[1]): ModelPrice(*r) for r in await cur.fetchall()}

    return result


async def send_live_keys(
    conn: Conn, keys: Sequence[tuple[str, str]], now: datetime
) -> Pending[dict[tuple[str, str], StoredKey]]:
    """Idempotency keys still live at `now` among (tenant_id, request_id) pairs."""
    cur = await conn.execute(
        """
        SELECT k.tenant_id, k.request_id, k.operation, k.request_hash, k.response
        FROM idempotency_keys k
        JOIN jsonb_array_elements(%s::jsonb) AS u(e)
          ON k.tenant_id = u.e->>0 AND k.request_id = u.e->>1
        WHERE k.expires_at > %s
        """,
        (_json(keys), now),
    )

    async def result() -> dict[tuple[str, str], StoredKey]:
        return {(r[0], r[1]): (r[2], r[3], r[4]) for r in await cur.fetchall()}

    return result


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _keys_json(keys: Sequence[TenantKey]) -> str:
    return _json([[t, r, p.value, w.isoformat()] for t, r, p, w in keys])


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


async def add_to_counters(conn: Conn, deltas: Mapping[TenantKey, tuple[int, int]]) -> None:
    keys = sorted((k for k, d in deltas.items() if d != (0, 0)), key=_order)
    if not keys:
        return
    await conn.execute(
        """
        UPDATE usage_counters c
           SET used = c.used + (u.e->>4)::bigint, reserved = c.reserved + (u.e->>5)::bigint
        FROM jsonb_array_elements(%s::jsonb) AS u(e)
        WHERE c.tenant_id = u.e->>0 AND c.resource = u.e->>1 AND c.period = u.e->>2
          AND c.window_start = (u.e->>3)::timestamptz
        """,
        (_json([[t, r, p.value, w.isoformat(), *deltas[(t, r, p, w)]] for t, r, p, w in keys]),),
    )


async def drop_counters(conn: Conn, keys: Sequence[TenantKey]) -> None:
    """Remove counter rows this transaction created but nothing used (as if never locked)."""
    if not keys:
        return
    await conn.execute(
        """
        DELETE FROM usage_counters c
        USING jsonb_array_elements(%s::jsonb) AS u(e)
        WHERE c.tenant_id = u.e->>0 AND c.resource = u.e->>1 AND c.period = u.e->>2
          AND c.window_start = (u.e->>3)::timestamptz AND c.used = 0 AND c.reserved = 0
        """,
        (_keys_json(keys),),
    )


async def insert_usage_records(conn: Conn, rows: Sequence[tuple[str, UsageRecordRow]]) -> None:
    if not rows:
        return
    payload = [
        [tenant_id, r.usage_record_id, r.resource, r.amount, r.kind, r.request_id,
         r.reservation_id, r.plan_id, r.provider, r.model, r.input_tokens, r.output_tokens,
         r.cost_micros, r.wallet_charged_micros, r.over_limit, dict(r.labels),
         r.occurred_at.isoformat()]
        for tenant_id, r in rows
    ]  # fmt: skip
    # one JSON document, not 17 arrays: psycopg escapes array elements one by one in Python
    await conn.execute(
        """
        INSERT INTO usage_records (tenant_id, usage_record_id, resource, amount, kind,
            request_id, reservation_id, plan_id, provider, model, input_tokens, output_tokens,
            cost_micros, wallet_charged_micros, over_limit, labels, occurred_at)
        SELECT e->>0, e->>1, e->>2, (e->>3)::bigint, e->>4, e->>5, e->>6, e->>7, e->>8, e->>9,
               (e->>10)::bigint, (e->>11)::bigint, (e->>12)::bigint, (e->>13)::bigint,
               (e->>14)::bool, e->15, (e->>16)::timestamptz
        FROM jsonb_array_elements(%s::jsonb) WITH ORDINALITY AS u(e, n)
        ORDER BY n
        """,
        (_json(payload),),
    )


async def debit_grants(conn: Conn, taken: Sequence[tuple[str, str, int]]) -> None:
    """(tenant_id, grant_id, micros) each, summed per grant."""
    total: dict[tuple[str, str], int] = {}
    for tenant_id, grant_id, micros in taken:
        total[(tenant_id, grant_id)] = total.get((tenant_id, grant_id), 0) + micros
    if not total:
        return
    keys = sorted(total)
    await conn.execute(
        "UPDATE wallet_grants g SET remaining_micros = g.remaining_micros - u.m"
        " FROM unnest(%s::text[], %s::text[], %s::bigint[]) AS u(t, id, m)"
        " WHERE g.tenant_id = u.t AND g.grant_id = u.id",
        ([k[0] for k in keys], [k[1] for k in keys], [total[k] for k in keys]),
    )


async def insert_ledger(
    conn: Conn, entries: Sequence[tuple[str, str, str, int, str | None, str]], now: datetime
) -> None:
    """(tenant_id, grant_id, kind, delta_micros, usage_record_id, reason) each, in order."""
    if not entries:
        return
    await conn.execute(
        """
        INSERT INTO wallet_ledger (tenant_id, grant_id, kind, delta_micros, usage_record_id,
                                   reason, created_at)
        SELECT t, g, k, d, u, r, %s
        FROM unnest(%s::text[], %s::text[], %s::text[], %s::bigint[], %s::text[], %s::text[])
             WITH ORDINALITY AS e(t, g, k, d, u, r, n)
        ORDER BY n
        """,
        (now, *([e[i] for e in entries] for i in range(6))),
    )


async def set_wallets(conn: Conn, wallets: Mapping[str, tuple[int, int]], now: datetime) -> None:
    """(balance, held) micros per tenant whose wallet this transaction has locked."""
    if not wallets:
        return
    tenants = sorted(wallets)
    await conn.execute(
        "UPDATE wallets w SET balance_micros = u.b, held_micros = u.h, updated_at = %s"
        " FROM unnest(%s::text[], %s::bigint[], %s::bigint[]) AS u(t, b, h)"
        " WHERE w.tenant_id = u.t",
        (now, tenants, [wallets[t][0] for t in tenants], [wallets[t][1] for t in tenants]),
    )


async def insert_notifications(
    conn: Conn, rows: Sequence[tuple[str, str, str, str, dict[str, Any]]], now: datetime
) -> None:
    """(tenant_id, kind, dedupe_key, message, details) each; the first of a key wins."""
    first: dict[tuple[str, str], tuple[str, str, str, str, dict[str, Any]]] = {}
    for row in rows:
        first.setdefault((row[0], row[2]), row)
    if not first:
        return
    await conn.execute(
        """
        INSERT INTO notifications (tenant_id, kind, dedupe_key, message, details, created_at)
        SELECT e->>0, e->>1, e->>2, e->>3, e->4, %s
        FROM jsonb_array_elements(%s::jsonb) WITH ORDINALITY AS u(e, n)
        ORDER BY n
        ON CONFLICT (tenant_id, dedupe_key) DO NOTHING
        """,
        (now, _json([list(r) for r in first.values()])),
    )


async def send_claims(
    conn: Conn,
    claims: Sequence[tuple[str, str, str, str, dict[str, Any]]],
    now: datetime,
    expires_at: datetime,
) -> Pending[int]:
    """Store (tenant_id, request_id, operation, request_hash, response) keys; the result is
    how many were taken — fewer than asked means another transaction took one first."""
    cur = await conn.execute(
        """
        INSERT INTO idempotency_keys AS k
            (tenant_id, request_id, operation, request_hash, response, created_at, expires_at)
        SELECT e->>0, e->>1, e->>2, e->>3, e->4, %s, %s
        FROM jsonb_array_elements(%s::jsonb) AS u(e)
        ON CONFLICT (tenant_id, request_id) DO UPDATE
           SET operation = EXCLUDED.operation, request_hash = EXCLUDED.request_hash,
               response = EXCLUDED.response, created_at = EXCLUDED.created_at,
               expires_at = EXCLUDED.expires_at
         WHERE k.expires_at <= EXCLUDED.created_at
        RETURNING 1
        """,
        (now, expires_at, _json([list(c) for c in claims])),
    )

    async def result() -> int:
        return len(await cur.fetchall())

    return result


async def send_offers(
    conn: Conn, wanted: Sequence[tuple[str, str | None]]
) -> Pending[dict[tuple[str, str | None], list[PlanOffer]]]:
    """plan_offers for several (resource, current plan) pairs in one round trip."""
    pending = [(w, await send_plan_offers(conn, *w)) for w in wanted]

    async def result() -> dict[tuple[str, str | None], list[PlanOffer]]:
        return {w: await p() for w, p in pending}

    return result
