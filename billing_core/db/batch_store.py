"""Set-based SQL for deciding a batch of CheckAndConsume, Reserve, Commit and Release
requests in one transaction.

Every statement covers all tenants of the batch at once. Reads come in two steps — `send_*`
queues the statement on the batch's Wire (libpq's pipeline, db/wire.py) and returns a
`Pending` that fetches its result — so several statements share one round trip. Every
statement answers with one row of JSON text (parsed by orjson), and its parameters are text
typed by casts in the SQL. Lock order is the one of quota_store (reservations → counters
→ wallet row → grants), by tenant first.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from typing import Any, TypeVar

import orjson

from billing_core.db.quota_store import (
    CLAIM_UNLESS_LIVE,
    CONTEXT_COLUMNS,
    CONTEXT_SQL,
    CONTEXT_TIMESTAMPS,
    PLAN_OFFERS_SQL,
    CounterKey,
    PlanOffer,
    ReservationRow,
    TenantContext,
    UsageRecordRow,
    context_from_row,
    offers_from_json,
    reservation_from_row,
    reservation_windows,
)
from billing_core.db.wire import Statement, Wire
from billing_core.pricing import ModelPrice
from billing_core.resources import PERIOD_ORDER, Period
from billing_core.wallet import LiveGrant

T = TypeVar("T")
Pending = Callable[[], Awaitable[T]]
TenantKey = tuple[str, str, Period, datetime]  # tenant, resource, period, window_start
StoredKey = tuple[str, str, dict[str, Any]]  # operation, request_hash, response


@dataclass(slots=True)
class Reads:
    contexts: dict[str, TenantContext]  # of the tenants that exist
    prices: dict[tuple[str, str], ModelPrice]  # in effect, of the models that have one
    taken: dict[tuple[str, str], StoredKey]  # live idempotency keys among the asked ones


# Contexts, prices and live idempotency keys in one statement, each as one JSON column
# (sent as text: orjson parses it several times faster than psycopg's json.loads).
# Every part reaches its rows through a primary key: always an index scan, whatever the
# table's size (a join against a JSON or array parameter can be planned as a full scan).
# The keys are looked up pair by pair (a LATERAL subquery with LIMIT 1 cannot be turned
# into a join): with `tenant_id = ANY(…) AND request_id = ANY(…)` PostgreSQL 15 scanned
# every key of the batch's tenants and filtered the request_ids, 20,000 keys of a busy
# tenant for each batch. Expiry is checked in the answer, not the WHERE clause (there, a
# generic plan can prefer the expires_at index, which covers every live key).
# (A part the batch does not need is left out of the statement, as in _writes.)
_CONTEXTS_PART = f"""
  (SELECT coalesce(json_agg(json_build_array({", ".join("c." + c for c in CONTEXT_COLUMNS)})),
                   '[]'::json)::text
     FROM ({CONTEXT_SQL}) c)"""
_PRICES_PART = """
  (SELECT coalesce(json_agg(json_build_array(m.provider, m.model, m.effective_from,
                   m.input_micros_per_million, m.output_micros_per_million)), '[]'::json)::text
     FROM (SELECT DISTINCT ON (m.provider, m.model) m.*
             FROM model_prices m
             JOIN unnest(%(providers)s::text[], %(models)s::text[]) AS u(p, mo)
               ON m.provider = u.p AND m.model = u.mo
            WHERE m.provider = ANY(%(providers)s::text[]) AND m.model = ANY(%(models)s::text[])
              AND m.effective_from <= %(now)s::timestamptz
            ORDER BY m.provider, m.model, m.effective_from DESC) m)"""
_KEYS_PART = """
  (SELECT coalesce(json_agg(json_build_array(k.tenant_id, k.request_id, k.operation,
                   k.request_hash, k.response, k.expires_at > %(now)s::timestamptz)),
                   '[]'::json)::text
     FROM unnest(%(key_tenants)s::text[], %(key_ids)s::text[]) AS u(t, r),
          LATERAL (SELECT * FROM idempotency_keys k
                    WHERE k.tenant_id = u.t AND k.request_id = u.r LIMIT 1) k)"""


@cache
def _reads(prices: bool, keys: bool) -> Statement:
    parts = (_CONTEXTS_PART, _PRICES_PART if prices else "'[]'", _KEYS_PART if keys else "'[]'")
    return Statement("SELECT" + ",".join(parts))


def send_reads(
    wire: Wire,
    tenant_ids: Sequence[str],
    resources: Sequence[str] | None,
    models: Sequence[tuple[str, str]],
    keys: Sequence[tuple[str, str]],
    now: datetime,
) -> Pending[Reads]:
    """What a batch reads before deciding: the tenants' contexts (with the quotas of
    `resources`; None: of every resource), the price in effect of each (provider, model),
    and which of the (tenant_id, request_id) pairs are live idempotency keys."""
    slot = wire.send(
        _reads(bool(models), bool(keys)),
        {
            "tenants": text_array(tenant_ids),
            "resources": None if resources is None else text_array(resources),
            "now": now.isoformat(),
            "providers": text_array(m[0] for m in models),
            "models": text_array(m[1] for m in models),
            "key_tenants": text_array(k[0] for k in keys),
            "key_ids": text_array(k[1] for k in keys),
        },
    )

    async def result() -> Reads:
        answer = await wire.result(slot)
        contexts, prices, taken = (orjson.loads(answer.get_value(0, i) or b"") for i in range(3))
        for c in contexts:
            for i in CONTEXT_TIMESTAMPS:
                c[i] = _timestamp(c[i])
        return Reads(
            {c[0]: context_from_row(c) for c in contexts},
            {(p[0], p[1]): ModelPrice(p[0], p[1], _timestamp(p[2]), p[3], p[4]) for p in prices},
            {(k[0], k[1]): (k[2], k[3], k[4]) for k in taken if k[5]},
        )

    return result


def _already(value: T) -> Pending[T]:
    """The result of a statement that did not need sending."""

    async def result() -> T:
        return value

    return result


def _timestamp(value: Any) -> Any:  # a timestamptz that came as JSON text
    return None if value is None else datetime.fromisoformat(value)


def text_array(values: Iterable[str]) -> str:
    """A text[] literal. Sent as one string, it costs psycopg far less than a list, whose
    elements it inspects one by one to choose an array type."""
    quoted = (v.replace("\\", "\\\\").replace('"', '\\"') for v in values)
    return "{" + ",".join(f'"{v}"' for v in quoted) + "}"


def _json(value: Any) -> str:
    # orjson: a batch's records and stored answers, ~15 times faster than json.dumps
    return orjson.dumps(value).decode()


def _key_json(key: TenantKey) -> list[str]:
    return [key[0], key[1], key[2].value, key[3].isoformat()]


def _keys_json(keys: Sequence[TenantKey]) -> str:
    return _json([_key_json(k) for k in keys])


def _record_json(tenant_id: str, r: UsageRecordRow) -> list[Any]:
    return [tenant_id, r.usage_record_id, r.resource, r.amount, r.kind, r.request_id,
            r.reservation_id, r.plan_id, r.provider, r.model, r.input_tokens, r.output_tokens,
            r.cost_micros, r.wallet_charged_micros, r.over_limit, dict(r.labels)]  # fmt: skip


def _reservation_json(r: NewReservation) -> list[Any]:
    windows = reservation_windows(r.windows)
    return [r.tenant_id, r.reservation_id, r.request_id, r.resource, r.amount, windows,
            r.held_micros, dict(r.labels), r.expires_at.isoformat()]  # fmt: skip


def _order(key: TenantKey) -> tuple[str, str, int, datetime]:
    return key[0], key[1], PERIOD_ORDER[key[2]], key[3]


# The reservations a batch commits or releases, locked before anything else (the global lock order:
# reservation, counters, wallet, grants), each looked up by its primary key.
_LOCK_RESERVATIONS = Statement("""
WITH locked AS (
    SELECT r.* FROM unnest(%(tenants)s::text[], %(ids)s::text[]) AS u(t, i),
         LATERAL (SELECT * FROM reservations r WHERE r.tenant_id = u.t AND r.reservation_id = u.i
                  LIMIT 1 FOR UPDATE) r
)
SELECT coalesce(json_agg(json_build_array(tenant_id, reservation_id, request_id, resource,
                amount, windows, held_micros, status, expires_at, commit_response)), '[]')::text
FROM locked
""")


def send_reservations(
    wire: Wire, wanted: Sequence[tuple[str, str]]
) -> Pending[dict[tuple[str, str], ReservationRow]]:
    """Lock the (tenant_id, reservation_id) reservations that exist, in the given order."""
    slot = wire.send(
        _LOCK_RESERVATIONS,
        {"tenants": text_array(w[0] for w in wanted), "ids": text_array(w[1] for w in wanted)},
    )

    async def result() -> dict[tuple[str, str], ReservationRow]:
        found = {}
        for tenant_id, *row in orjson.loads(await wire.value(slot) or b""):
            row[7] = _timestamp(row[7])  # expires_at (quota_store._RESERVATION_COLUMNS)
            found[(tenant_id, row[0])] = reservation_from_row(row)
        return found

    return result


@dataclass(slots=True)
class Locked:
    counters: dict[TenantKey, tuple[int, int, bool]]  # used, reserved, created just now
    wallets: dict[str, tuple[int, int]]  # balance, held — of the wallets that exist
    grants: dict[str, list[LiveGrant]]  # live ones, in the order they pay (wallet.py)


# Counters (created if missing), then wallets, then grants — the global lock order: the
# branches of a UNION ALL run one after the other, each reading its CTE to the end.
# A missing wallet is an empty one: it pays nothing (a Commit that owes something
# creates it, empty, as quota_store.lock_wallet does).
_LOCK_COUNTERS = """
counters AS (
    INSERT INTO usage_counters AS c (tenant_id, resource, period, window_start)
    SELECT e->>0, e->>1, e->>2, (e->>3)::timestamptz
    FROM jsonb_array_elements(%(counters)s::jsonb) WITH ORDINALITY AS u(e, n)
    ORDER BY n
    ON CONFLICT (tenant_id, resource, period, window_start)
    DO UPDATE SET used = c.used
    RETURNING tenant_id, resource, period, window_start, used, reserved, xmax = 0 AS created
)"""
_LOCK_WALLETS = """
wallets AS (
    SELECT tenant_id, balance_micros, held_micros FROM wallets
    WHERE tenant_id = ANY(%(wallets)s::text[]) ORDER BY tenant_id FOR UPDATE
), grants AS (
    SELECT tenant_id, grant_id, remaining_micros, expires_at, created_at FROM wallet_grants
    WHERE tenant_id = ANY(%(wallets)s::text[]) AND NOT expired AND remaining_micros > 0
    ORDER BY tenant_id, expires_at NULLS LAST, created_at, grant_id FOR UPDATE
)"""
_LOCKED_COUNTERS = """
    SELECT 'c', tenant_id, resource, period, window_start, used, reserved, created,
           NULL::timestamptz FROM counters"""
_LOCKED_WALLETS = """
    SELECT 'w', tenant_id, NULL, NULL, NULL, balance_micros, held_micros, NULL, NULL
      FROM wallets
    UNION ALL
    SELECT 'g', tenant_id, grant_id, NULL, expires_at, remaining_micros, NULL, NULL, created_at
      FROM grants"""


@cache
def _locks(counters: bool, wallets: bool) -> Statement:
    ctes = [c for c, wanted in ((_LOCK_COUNTERS, counters), (_LOCK_WALLETS, wallets)) if wanted]
    rows = [r for r, wanted in ((_LOCKED_COUNTERS, counters), (_LOCKED_WALLETS, wallets)) if wanted]
    return Statement(f"""
WITH {", ".join(ctes)}
SELECT coalesce(json_agg(json_build_array(kind, tenant_id, name, period, at, n1, n2, created)
                         ORDER BY kind, tenant_id, at NULLS LAST, created_at, name), '[]')::text
FROM ({" UNION ALL ".join(rows)}
) l(kind, tenant_id, name, period, at, n1, n2, created, created_at)
""")


def send_locks(
    wire: Wire, keys: Sequence[TenantKey], wallet_tenants: Sequence[str]
) -> Pending[Locked]:
    """Create-if-missing and lock counter rows, then lock wallets and their live grants."""
    if not keys and not wallet_tenants:
        return _already(Locked({}, {}, {}))
    slot = wire.send(
        _locks(bool(keys), bool(wallet_tenants)),
        {
            "counters": _keys_json(sorted(set(keys), key=_order)),
            "wallets": text_array(sorted(set(wallet_tenants))),
        },
    )

    async def result() -> Locked:
        locked = Locked({}, {}, {})
        for kind, t, name, period, at, n1, n2, created in orjson.loads(
            await wire.value(slot) or b""
        ):
            if kind == "c":
                locked.counters[(t, name, Period(period), _timestamp(at))] = (n1, n2, created)
            elif kind == "w":
                locked.wallets[t] = (n1, n2)
            else:
                locked.grants.setdefault(t, []).append(LiveGrant(name, n1, _timestamp(at)))
        return locked

    return result


# --- writes ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NewReservation:
    """A reservation a batch creates (what quota_store.insert_reservation writes)."""

    tenant_id: str
    reservation_id: str
    request_id: str
    resource: str
    amount: int
    windows: Sequence[CounterKey]  # the counter windows its amount went to
    held_micros: int
    labels: Mapping[str, str]
    expires_at: datetime

    def row(self) -> ReservationRow:
        """As a Commit finds it while it is live."""
        return ReservationRow(
            self.reservation_id, self.request_id, self.resource, self.amount,
            tuple(self.windows), self.held_micros, "active", self.expires_at, None,
        )  # fmt: skip


@dataclass(slots=True)
class BatchWrites:
    """Everything a batch writes, applied by one statement (send_writes)."""

    deltas: dict[TenantKey, tuple[int, int]] = field(default_factory=dict)
    dropped: list[TenantKey] = field(default_factory=list)  # created, then nothing used them
    records: list[tuple[str, UsageRecordRow]] = field(default_factory=list)
    reservations: list[NewReservation] = field(default_factory=list)
    # reservations committed or released: tenant, reservation_id, status, usage_record_id,
    # commit_response (the last two None for a release)
    finished: list[tuple[str, str, str, str | None, dict[str, Any] | None]] = field(
        default_factory=list
    )
    debits: list[tuple[str, str, int]] = field(default_factory=list)  # tenant, grant, micros
    # tenant, grant, kind, delta_micros, usage_record_id, reason — in order
    ledger: list[tuple[str, str, str, int, str | None, str]] = field(default_factory=list)
    wallets: dict[str, tuple[int, int]] = field(default_factory=dict)  # balance, held
    # tenant, kind, dedupe_key, message, details — the first of a key wins
    notes: list[tuple[str, str, str, str, dict[str, Any]]] = field(default_factory=list)
    # tenant, request_id, operation, request_hash, response
    claims: list[tuple[str, str, str, str, dict[str, Any]]] = field(default_factory=list)


# One statement of data-modifying CTEs, made of the parts a batch has something for (each
# combination is its own prepared statement: PostgreSQL initialises every part of a plan
# on every execution, the empty ones too — a fifth of its CPU for a lone request).
# The parts touch disjoint rows, so running them in one snapshot is the same as one by one.
# Every part finds its rows through a primary key with array conditions (or ON CONFLICT),
# so no part can be planned as a full scan of a big table;
# when fewer idempotency keys could be taken than asked (another transaction took one
# first), quota_expect_claims fails the statement, which rolls the batch back.
_WRITE_PARTS = {
    "counters": """
    UPDATE usage_counters c SET used = c.used + (u.e->>4)::bigint,
                                reserved = c.reserved + (u.e->>5)::bigint
    FROM jsonb_array_elements(%(deltas)s::jsonb) AS u(e)
    WHERE c.tenant_id = ANY(%(delta_tenants)s::text[])
      AND c.window_start = ANY(%(delta_starts)s::timestamptz[])
      AND c.tenant_id = u.e->>0 AND c.resource = u.e->>1 AND c.period = u.e->>2
      AND c.window_start = (u.e->>3)::timestamptz
""",
    "dropped": """
    DELETE FROM usage_counters c
    USING jsonb_array_elements(%(dropped)s::jsonb) AS u(e)
    WHERE c.tenant_id = ANY(%(dropped_tenants)s::text[])
      AND c.window_start = ANY(%(dropped_starts)s::timestamptz[])
      AND c.tenant_id = u.e->>0 AND c.resource = u.e->>1 AND c.period = u.e->>2
      AND c.window_start = (u.e->>3)::timestamptz AND c.used = 0 AND c.reserved = 0
""",
    "records": """
    INSERT INTO usage_records (tenant_id, usage_record_id, resource, amount, kind,
        request_id, reservation_id, plan_id, provider, model, input_tokens, output_tokens,
        cost_micros, wallet_charged_micros, over_limit, labels, occurred_at)
    SELECT e->>0, e->>1, e->>2, (e->>3)::bigint, e->>4, e->>5, e->>6, e->>7, e->>8, e->>9,
           (e->>10)::bigint, (e->>11)::bigint, (e->>12)::bigint, (e->>13)::bigint,
           (e->>14)::bool, e->15, %(now)s::timestamptz
    FROM jsonb_array_elements(%(records)s::jsonb) WITH ORDINALITY AS u(e, n)
    ORDER BY n
""",
    "reservations": """
    INSERT INTO reservations (tenant_id, reservation_id, request_id, resource, amount,
        windows, held_micros, labels, expires_at, created_at)
    SELECT e->>0, e->>1, e->>2, e->>3, (e->>4)::bigint, e->5, (e->>6)::bigint, e->7,
           (e->>8)::timestamptz, %(now)s::timestamptz
    FROM jsonb_array_elements(%(reservations)s::jsonb) WITH ORDINALITY AS u(e, n)
    ORDER BY n
""",
    "finished": """
    UPDATE reservations r SET status = v.e->>2, finished_at = %(now)s::timestamptz,
                              usage_record_id = v.e->>3,
                              commit_response = nullif(v.e->4, 'null'::jsonb)
    FROM (SELECT u.e, x.ctid AS row_id
            FROM jsonb_array_elements(%(finished)s::jsonb) AS u(e),
                 LATERAL (SELECT ctid FROM reservations x
                           WHERE x.tenant_id = u.e->>0 AND x.reservation_id = u.e->>1
                           LIMIT 1) x) v
    WHERE r.ctid = v.row_id
""",
    "grants": """
    UPDATE wallet_grants g SET remaining_micros = g.remaining_micros - (u.e->>2)::bigint
    FROM jsonb_array_elements(%(debits)s::jsonb) AS u(e)
    WHERE g.tenant_id = ANY(%(debit_tenants)s::text[])
      AND g.grant_id = ANY(%(debit_grants)s::text[])
      AND g.tenant_id = u.e->>0 AND g.grant_id = u.e->>1
""",
    "ledger": """
    INSERT INTO wallet_ledger (tenant_id, grant_id, kind, delta_micros, usage_record_id,
                               reason, created_at)
    SELECT e->>0, e->>1, e->>2, (e->>3)::bigint, e->>4, e->>5, %(now)s::timestamptz
    FROM jsonb_array_elements(%(ledger)s::jsonb) WITH ORDINALITY AS u(e, n)
    ORDER BY n
""",
    "wallets": """
    INSERT INTO wallets AS w (tenant_id, balance_micros, held_micros, updated_at)
    SELECT e->>0, (e->>1)::bigint, (e->>2)::bigint, %(now)s::timestamptz
    FROM jsonb_array_elements(%(wallets)s::jsonb) WITH ORDINALITY AS u(e, n)
    ORDER BY n
    ON CONFLICT (tenant_id) DO UPDATE SET balance_micros = EXCLUDED.balance_micros,
        held_micros = EXCLUDED.held_micros, updated_at = EXCLUDED.updated_at
""",
    "notes": """
    INSERT INTO notifications (tenant_id, kind, dedupe_key, message, details, created_at)
    SELECT e->>0, e->>1, e->>2, e->>3, e->4, %(now)s::timestamptz
    FROM jsonb_array_elements(%(notes)s::jsonb) WITH ORDINALITY AS u(e, n)
    ORDER BY n
    ON CONFLICT (tenant_id, dedupe_key) DO NOTHING
""",
    "claims": """
    INSERT INTO idempotency_keys AS k
        (tenant_id, request_id, operation, request_hash, response, created_at, expires_at)
    SELECT e->>0, e->>1, e->>2, e->>3, e->4, %(now)s::timestamptz, %(expires)s::timestamptz
    FROM jsonb_array_elements(%(claims)s::jsonb) AS u(e)
"""
    + CLAIM_UNLESS_LIVE
    + """
    RETURNING 1
""",
}


@cache
def _writes(parts: tuple[str, ...]) -> Statement:
    # each part is named apart from every table: a CTE's name hides the table's in the parts
    ctes = ",\n".join(f"written_{name} AS ({_WRITE_PARTS[name]})" for name in parts)
    taken = "(SELECT count(*) FROM written_claims)" if "claims" in parts else "0"
    return Statement(f"WITH {ctes}\nSELECT quota_expect_claims(%(expected)s::bigint, {taken})")


CLAIM_RACE_SQLSTATE = "QB001"  # raised by quota_expect_claims (migration 0004)


def send_writes(wire: Wire, w: BatchWrites, now: datetime, expires_at: datetime) -> Pending[int]:
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
    values: dict[str, Any] = {"now": now.isoformat(), "expected": len(w.claims)}
    parts: list[str] = []  # in the order of _WRITE_PARTS
    if deltas:
        parts.append("counters")
        values["deltas"] = _json([[*_key_json(k), *w.deltas[k]] for k in deltas])
        values["delta_tenants"] = text_array(sorted({k[0] for k in deltas}))
        values["delta_starts"] = text_array(sorted({k[3].isoformat() for k in deltas}))
    if w.dropped:
        parts.append("dropped")
        values["dropped"] = _keys_json(w.dropped)
        values["dropped_tenants"] = text_array(sorted({k[0] for k in w.dropped}))
        values["dropped_starts"] = text_array(sorted({k[3].isoformat() for k in w.dropped}))
    if w.records:
        parts.append("records")
        values["records"] = _json([_record_json(t, r) for t, r in w.records])
    if w.reservations:
        parts.append("reservations")
        values["reservations"] = _json([_reservation_json(r) for r in w.reservations])
    if w.finished:
        parts.append("finished")
        values["finished"] = _json([list(c) for c in w.finished])
    if debits:
        parts.append("grants")
        values["debits"] = _json([[t, g, m] for (t, g), m in sorted(debits.items())])
        values["debit_tenants"] = text_array(sorted({t for t, _ in debits}))
        values["debit_grants"] = text_array(sorted({g for _, g in debits}))
    if w.ledger:
        parts.append("ledger")
        values["ledger"] = _json([list(e) for e in w.ledger])
    if w.wallets:
        parts.append("wallets")
        values["wallets"] = _json([[t, b, h] for t, (b, h) in sorted(w.wallets.items())])
    if notes:
        parts.append("notes")
        values["notes"] = _json([list(n) for n in notes.values()])
    if w.claims:
        parts.append("claims")
        values["claims"] = _json([list(c) for c in w.claims])
        values["expires"] = expires_at.isoformat()
    if not parts:  # denials and dry runs only: nothing to write
        return _already(0)
    slot = wire.send(_writes(tuple(parts)), values)

    async def result() -> int:
        return int(await wire.value(slot) or b"0")

    return result


_OFFERS = Statement(PLAN_OFFERS_SQL)


def send_offers(
    wire: Wire, wanted: Sequence[tuple[str, str | None]]
) -> Pending[dict[tuple[str, str | None], list[PlanOffer]]]:
    """plan_offers (quota_store) for several (resource, current plan) pairs."""
    slots = [(w, wire.send(_OFFERS, {"resource": w[0], "exclude": w[1]})) for w in wanted]

    async def result() -> dict[tuple[str, str | None], list[PlanOffer]]:
        return {w: offers_from_json(w[0], await wire.value(s) or b"") for w, s in slots}

    return result
