"""The quota engine's SQL: each statement of a transaction of decisions, with the encoding
of its parameters and the decoding of its one JSON answer (db/quota_store.py sends them).

Every statement reaches its rows through a primary key or a partial index, with array
conditions or LATERAL lookups a generic plan cannot turn into a full scan
(tests/integration/test_query_plans.py counts the scans).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import cache
from typing import Any

import orjson

from billing_core.db.wire import Statement
from billing_core.quota.model import Changes, PlanOffer, TenantContext, TenantKey
from billing_core.rules.limits import Access, Quota, SubscriptionStatus
from billing_core.rules.periods import tenant_zone
from billing_core.rules.resources import PERIOD_ORDER, Overage, Period

CLAIM_RACE_SQLSTATE = "QB001"  # raised by quota_expect_claims (migration 0004)


# Every row a transaction touches is reached through an index, by plans made once per
# connection: generic plans (PostgreSQL would otherwise re-plan the read statement for every
# transaction) with sequential scans ruled out (a generic plan made while the tables were
# small would go on scanning them once they had grown). Local to the transaction, so other
# users of the connection keep PostgreSQL's own choices. A transaction also waits at most
# `lock_timeout` for a row lock held elsewhere (0: no limit).
# Without generic plans (DB_GENERIC_PLANS=off) each statement is planned with its values:
# what tables partitioned or distributed by tenant need to reach the tenant's partition only
# (a generic plan cannot prune by `tenant_id = ANY($1)`), at the cost of planning each time.
def plan_settings(*, generic: bool) -> dict[str, str]:
    """The plan settings, for a whole session on connections that serve the quota engine
    only (the sidecar's)."""
    mode = "force_generic_plan" if generic else "force_custom_plan"
    return {"enable_seqscan": "off", "plan_cache_mode": mode}


@cache
def transaction_settings(*, generic: bool) -> Statement:
    """The same, local to one transaction, with its lock timeout."""
    mode = "force_generic_plan" if generic else "force_custom_plan"
    return Statement(
        "SELECT set_config('enable_seqscan', 'off', true),"
        f" set_config('plan_cache_mode', '{mode}', true),"
        " set_config('lock_timeout', %(lock_timeout)s, true)"
    )


def text_array(values: Iterable[str]) -> str:
    """A text[] literal: sent as one string, it costs psycopg far less than a list."""
    quoted = (v.replace("\\", "\\\\").replace('"', '\\"') for v in values)
    return "{" + ",".join(f'"{v}"' for v in quoted) + "}"


def timestamp(value: Any) -> Any:
    """A timestamptz that came as JSON text."""
    return None if value is None else datetime.fromisoformat(value)


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


# --- contexts, prices, taken request_ids -------------------------------------------------

# The tenant, its current subscription and plan, the live wallet, the quotas (overrides
# first: they win over the plan's quota of the same resource and period) and whether
# lazily expiring state waits. The flags are scalar subqueries, not EXISTS (PostgreSQL 18
# may plan an EXISTS as a hashed subplan reading the whole table); subscription and plan are
# LATERAL lookups with LIMIT 1, so a generic plan never hashes every current subscription.
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
_CONTEXT_COLUMNS = (
    "tenant_id", "timezone", "created_at", "plan_id", "status", "trial_end", "past_due_since",
    "billing_cycle_anchor", "unlimited", "enterprise", "wallet_live_micros", "quotas",
    "has_expired_reservations", "has_due_grants",
)  # fmt: skip


def context_from_row(row: Sequence[Any]) -> TenantContext:
    """A context from the JSON row of CONTEXT_SQL's columns."""
    tenant_id, tz, created_at, plan_id, status, trial_end, past_due_since, anchor = row[:8]
    unlimited, ent, live, quota_rows, has_expired, has_due = row[8:]
    quotas: dict[str, dict[Period, Quota]] = {}
    # overrides come first and win over the plan's quota of the same (resource, period)
    for res, period, limit, warn_at, overage in quota_rows:
        quotas.setdefault(res, {}).setdefault(
            Period(period), Quota(res, Period(period), limit, tuple(warn_at), Overage(overage))
        )
    tenant_zone(tz)  # fail loudly on a bad stored timezone
    trial_end = timestamp(trial_end)
    return TenantContext(
        tenant_id=tenant_id,
        timezone=tz,
        anchor=timestamp(anchor or created_at),
        plan_id=plan_id,
        access=Access(
            SubscriptionStatus(status) if status else None, trial_end, timestamp(past_due_since)
        ),
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


# Contexts, prices and live request_ids in one statement, each as one JSON column.
# The request_ids are looked up pair by pair (a LATERAL subquery with LIMIT 1): with
# `tenant_id = ANY(…) AND request_id = ANY(…)` PostgreSQL 15 read every key of the batch's
# tenants. Expiry is checked in the answer, not the WHERE clause, where a generic plan could
# prefer the expires_at index, which covers every live key.
_CONTEXTS_PART = f"""
  (SELECT coalesce(json_agg(json_build_array({", ".join("c." + c for c in _CONTEXT_COLUMNS)})),
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


# --- reservations ---------------------------------------------------------------------------

_RESERVATION_JSON = """
json_build_array(r.tenant_id, r.reservation_id, r.request_id, r.resource, r.amount, r.windows,
                 r.held_micros, r.status, r.expires_at, r.commit_response)"""

# the reservations a transaction commits or releases, locked before anything else, each
# looked up by its primary key
LOCK_RESERVATIONS = Statement(f"""
WITH r AS (
    SELECT r.* FROM unnest(%(tenants)s::text[], %(ids)s::text[]) AS u(t, i),
         LATERAL (SELECT * FROM reservations r WHERE r.tenant_id = u.t AND r.reservation_id = u.i
                  LIMIT 1 FOR UPDATE) r
)
SELECT coalesce(json_agg({_RESERVATION_JSON}), '[]')::text FROM r
""")


@cache
def lapsed_reservations(*, lock: bool) -> Statement:
    """Active reservations past their expiry of the tenants (through ix_reservations_live);
    locked ones skip what another transaction holds: it is settling or releasing them, and
    waiting for it would break the lock order (reservations before counters)."""
    return Statement(f"""
WITH r AS (
    SELECT r.* FROM reservations r
     WHERE r.tenant_id = ANY(%(tenants)s::text[]) AND r.status = 'active'
       AND r.expires_at <= %(now)s::timestamptz
     ORDER BY r.tenant_id, r.reservation_id{" FOR UPDATE SKIP LOCKED" if lock else ""}
)
SELECT coalesce(json_agg({_RESERVATION_JSON} ORDER BY r.tenant_id, r.reservation_id),
                '[]')::text FROM r
""")


LAPSED_RESERVATIONS = lapsed_reservations(lock=True)


def reservation_windows(windows: Iterable[tuple[str, Period, datetime]]) -> list[dict[str, str]]:
    """A reservation's counter windows as its `windows` column holds them."""
    return [{"period": p.value, "window_start": start.isoformat()} for _, p, start in windows]


# --- locks -----------------------------------------------------------------------------------

# Counters (created if missing; `empty` ones are dropped again when nothing used them: an
# empty counter counts as no counter), then wallets, then grants — the lock order: the branches
# of a UNION ALL run one after the other, each reading its CTE to the end. A missing wallet
# is an empty one. Grants: those that still count, past their expiry or not, in the order
# they pay (rules/wallet.py).
_LOCK_COUNTERS = """
counters AS (
    INSERT INTO usage_counters AS c (tenant_id, resource, period, window_start)
    SELECT e->>0, e->>1, e->>2, (e->>3)::timestamptz
    FROM jsonb_array_elements(%(counters)s::jsonb) WITH ORDINALITY AS u(e, n)
    ORDER BY n
    ON CONFLICT (tenant_id, resource, period, window_start)
    DO UPDATE SET used = c.used
    RETURNING tenant_id, resource, period, window_start, used, reserved,
              used = 0 AND reserved = 0 AS empty
)"""
_LOCK_WALLETS = """
wallets AS (
    SELECT tenant_id, balance_micros, held_micros FROM wallets
    WHERE tenant_id = ANY(%(wallets)s::text[]) ORDER BY tenant_id FOR UPDATE
), grants AS (
    SELECT tenant_id, grant_id, remaining_micros, expires_at, created_at FROM wallet_grants
    WHERE tenant_id = ANY(%(wallets)s::text[]) AND NOT expired
      AND (remaining_micros > 0 OR expires_at <= %(now)s::timestamptz)
    ORDER BY tenant_id, expires_at NULLS LAST, created_at, grant_id FOR UPDATE
)"""
_LOCKED_COUNTERS = """
    SELECT 'c', tenant_id, resource, period, window_start, used, reserved, empty,
           NULL::timestamptz FROM counters"""
_LOCKED_WALLETS = """
    SELECT 'w', tenant_id, NULL, NULL, NULL, balance_micros, held_micros, NULL, NULL
      FROM wallets
    UNION ALL
    SELECT 'g', tenant_id, grant_id, NULL, expires_at, remaining_micros, NULL, NULL, created_at
      FROM grants"""


def _locked_part(counters: bool, wallets: bool) -> tuple[list[str], str]:
    """The CTEs that lock, and the JSON text of what they locked."""
    ctes = [c for c, wanted in ((_LOCK_COUNTERS, counters), (_LOCK_WALLETS, wallets)) if wanted]
    rows = [r for r, wanted in ((_LOCKED_COUNTERS, counters), (_LOCKED_WALLETS, wallets)) if wanted]
    return (
        ctes,
        f"""
  (SELECT coalesce(json_agg(json_build_array(kind, tenant_id, name, period, at, n1, n2, empty)
                            ORDER BY kind, tenant_id, at NULLS LAST, created_at, name), '[]')::text
     FROM ({" UNION ALL ".join(rows)}
     ) l(kind, tenant_id, name, period, at, n1, n2, empty, created_at))""",
    )


@cache
def _locks(counters: bool, wallets: bool) -> Statement:
    ctes, locked = _locked_part(counters, wallets)
    return Statement(f"WITH {', '.join(ctes)}\nSELECT{locked}")


@cache
def reads(prices: bool, keys: bool, counters: bool = False, wallets: bool = False) -> Statement:
    """The contexts, the prices and request_ids when asked, and the rows locked when asked
    (a part a transaction does not need is left out: each combination is its own prepared
    statement). The reads see the snapshot taken before any lock was waited for, as they
    would in a statement of their own sent first."""
    parts = [_CONTEXTS_PART, _PRICES_PART if prices else "'[]'", _KEYS_PART if keys else "'[]'"]
    if not counters and not wallets:
        return Statement("SELECT" + ",".join(parts))
    ctes, locked = _locked_part(counters, wallets)
    return Statement(f"WITH {', '.join(ctes)}\nSELECT" + ",".join([*parts, locked]))


def _order(key: TenantKey) -> tuple[str, str, int, datetime]:
    return key[0], key[1], PERIOD_ORDER[key[2]], key[3]


def _key_json(key: TenantKey) -> list[str]:
    return [key[0], key[1], key[2].value, key[3].isoformat()]


def _keys_json(keys: Sequence[TenantKey]) -> str:
    return _json([_key_json(k) for k in keys])


def locks(
    counters: Sequence[TenantKey], wallets: Sequence[str], now: datetime
) -> tuple[Statement, dict[str, str]]:
    """The statement and parameters that lock these counter rows (in the lock order) and
    these tenants' wallets with their grants."""
    return _locks(bool(counters), bool(wallets)), lock_parameters(counters, wallets, now)


def lock_parameters(
    counters: Sequence[TenantKey], wallets: Sequence[str], now: datetime
) -> dict[str, str]:
    return {
        "counters": _keys_json(sorted(set(counters), key=_order)),
        "wallets": text_array(sorted(set(wallets))),
        "now": now.isoformat(),
    }


# counter values without locking them, each looked up by its primary key
COUNTERS = Statement("""
SELECT coalesce(json_agg(json_build_array(c.tenant_id, c.resource, c.period, c.window_start,
                                          c.used, c.reserved)), '[]')::text
FROM unnest(%(tenants)s::text[], %(resources)s::text[], %(periods)s::text[],
            %(starts)s::timestamptz[]) AS u(t, r, p, w),
     LATERAL (SELECT * FROM usage_counters c
               WHERE c.tenant_id = u.t AND c.resource = u.r AND c.period = u.p
                 AND c.window_start = u.w LIMIT 1) c
""")


# --- writes ----------------------------------------------------------------------------------

# One statement of data-modifying CTEs, made of the parts a transaction has something for
# (each combination is its own prepared statement: PostgreSQL initialises every part of a
# plan on every execution, the empty ones too). The parts touch disjoint rows, so running
# them in one snapshot is the same as one after the other. When another transaction took one
# of the request_ids first (fewer claims written than asked, or one left free found taken),
# quota_expect_claims fails the statement, which rolls the transaction back.
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
           (e->>14)::bool, e->15, coalesce((e->>16)::timestamptz, %(now)s::timestamptz)
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
    UPDATE reservations r SET status = u.e->>2, finished_at = %(now)s::timestamptz,
                              usage_record_id = u.e->>3,
                              commit_response = nullif(u.e->4, 'null'::jsonb)
    FROM jsonb_array_elements(%(finished)s::jsonb) AS u(e)
    WHERE r.tenant_id = ANY(%(finished_tenants)s::text[])
      AND r.reservation_id = ANY(%(finished_ids)s::text[])
      AND r.tenant_id = u.e->>0 AND r.reservation_id = u.e->>1
""",
    "grants": """
    UPDATE wallet_grants g SET remaining_micros = g.remaining_micros - (u.e->>2)::bigint
    FROM jsonb_array_elements(%(debits)s::jsonb) AS u(e)
    WHERE g.tenant_id = ANY(%(debit_tenants)s::text[])
      AND g.grant_id = ANY(%(debit_grants)s::text[])
      AND g.tenant_id = u.e->>0 AND g.grant_id = u.e->>1
""",
    "expired_grants": """
    UPDATE wallet_grants g SET expired = true, remaining_micros = 0
    FROM jsonb_array_elements(%(expired)s::jsonb) AS u(e)
    WHERE g.tenant_id = ANY(%(expired_tenants)s::text[])
      AND g.grant_id = ANY(%(expired_grants)s::text[])
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
    # a request_id is taken over only once it has expired; a live one stays its owner's
    "claims": """
    INSERT INTO idempotency_keys AS k
        (tenant_id, request_id, operation, request_hash, response, created_at, expires_at)
    SELECT e->>0, e->>1, e->>2, e->>3, e->4, %(now)s::timestamptz, %(expires)s::timestamptz
    FROM jsonb_array_elements(%(claims)s::jsonb) AS u(e)
    ON CONFLICT (tenant_id, request_id) DO UPDATE
       SET operation = EXCLUDED.operation, request_hash = EXCLUDED.request_hash,
           response = EXCLUDED.response, created_at = EXCLUDED.created_at,
           expires_at = EXCLUDED.expires_at
     WHERE k.expires_at <= EXCLUDED.created_at
    RETURNING 1
""",
    # request_ids this transaction found free and leaves free: a copy of one of its requests
    # that another transaction answered meanwhile shows here (the one that waited for the
    # other's row locks was denied where the other was allowed, say)
    "unclaimed": """
    SELECT 1 FROM unnest(%(unclaimed_tenants)s::text[], %(unclaimed_ids)s::text[]) AS u(t, r),
         LATERAL (SELECT 1 FROM idempotency_keys k
                   WHERE k.tenant_id = u.t AND k.request_id = u.r
                     AND k.expires_at > %(now)s::timestamptz LIMIT 1) k
""",
}


@cache
def writes(parts: tuple[str, ...]) -> Statement:
    # each part is named apart from every table: a CTE's name hides the table's in the parts
    ctes = ",\n".join(f"written_{name} AS ({_WRITE_PARTS[name]})" for name in parts)
    taken = "(SELECT count(*) FROM written_claims)" if "claims" in parts else "0"
    if "unclaimed" in parts:  # each one taken meanwhile makes the count fall short
        taken += " - (SELECT count(*) FROM written_unclaimed)"
    return Statement(f"WITH {ctes}\nSELECT quota_expect_claims(%(expected)s::bigint, {taken})")


def write_parameters(
    w: Changes, now: datetime, keys_expire_at: datetime
) -> tuple[tuple[str, ...], dict[str, Any]]:
    """The parts of the write statement the changes need (in _WRITE_PARTS' order) and their
    parameters. Every record of a transaction occurs at `now`."""
    deltas = sorted((k for k, d in w.deltas.items() if d != (0, 0)), key=_order)
    debits: dict[tuple[str, str], int] = {}
    for tenant_id, grant_id, micros in w.debits:
        debits[(tenant_id, grant_id)] = debits.get((tenant_id, grant_id), 0) + micros
    notes: dict[tuple[str, str], tuple[str, str, str, str, dict[str, Any]]] = {}
    for note in w.notes:
        notes.setdefault((note[0], note[2]), note)
    values: dict[str, Any] = {"now": now.isoformat(), "expected": len(w.claims)}
    parts: list[str] = []
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
        # a record happens now, but a reported one (ReportUsage) when it was used
        values["records"] = _json(
            [
                [t, r.usage_record_id, *r[2:15], dict(r.labels)]
                + ([] if r.occurred_at == now else [r.occurred_at.isoformat()])
                for t, r in w.records
            ]
        )
    if w.reservations:
        parts.append("reservations")
        values["reservations"] = _json(
            [
                [r.tenant_id, r.reservation_id, r.request_id, r.resource, r.amount,
                 reservation_windows(r.windows), r.held_micros, dict(r.labels),
                 r.expires_at.isoformat()]
                for r in w.reservations
            ]
        )  # fmt: skip
    if w.finished:
        parts.append("finished")
        values["finished"] = _json([[t, rid, *rest] for (t, rid), rest in w.finished.items()])
        values["finished_tenants"] = text_array(sorted({t for t, _ in w.finished}))
        values["finished_ids"] = text_array(sorted({rid for _, rid in w.finished}))
    if debits:
        parts.append("grants")
        values["debits"] = _json([[t, g, m] for (t, g), m in sorted(debits.items())])
        values["debit_tenants"] = text_array(sorted({t for t, _ in debits}))
        values["debit_grants"] = text_array(sorted({g for _, g in debits}))
    if w.expired_grants:
        parts.append("expired_grants")
        values["expired"] = _json([list(e) for e in w.expired_grants])
        values["expired_tenants"] = text_array(sorted({t for t, _ in w.expired_grants}))
        values["expired_grants"] = text_array(sorted({g for _, g in w.expired_grants}))
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
        values["expires"] = keys_expire_at.isoformat()
    if w.unclaimed:
        parts.append("unclaimed")
        values["unclaimed_tenants"] = text_array(t for t, _ in w.unclaimed)
        values["unclaimed_ids"] = text_array(r for _, r in w.unclaimed)
    return tuple(parts), values


# --- upgrade offers ------------------------------------------------------------------------

# active, self-serve plans cheapest first, with their quotas of a resource
OFFERS = Statement("""
SELECT coalesce(json_agg(json_build_array(p.plan_id, p.unlimited, q.period, q."limit",
                                          q.warn_at, q.overage)
                         ORDER BY p.price_cents, p.priority DESC, p.plan_id, q.period), '[]')::text
FROM plans p LEFT JOIN plan_quotas q ON q.plan_id = p.plan_id AND q.resource = %(resource)s::text
WHERE p.active AND NOT p.enterprise AND p.plan_id IS DISTINCT FROM %(exclude)s::text
""")


def offers_from_json(resource: str, text: bytes | str) -> list[PlanOffer]:
    offers: dict[str, PlanOffer] = {}
    for plan_id, unlimited, period, limit, warn_at, overage in orjson.loads(text):
        offer = offers.setdefault(plan_id, PlanOffer(plan_id, unlimited, ()))
        if period is not None:
            quota = Quota(resource, Period(period), limit, tuple(warn_at), Overage(overage))
            offers[plan_id] = PlanOffer(plan_id, unlimited, (*offer.quotas, quota))
    return list(offers.values())


# --- sweeps ----------------------------------------------------------------------------------

# tenants with a reservation or a grant past its expiry that still counts (through the
# partial indexes ix_reservations_expiry and ix_wallet_grants_due)
LAPSED_TENANTS = """
SELECT coalesce(json_agg(t.tenant_id ORDER BY t.tenant_id), '[]')::text FROM (
    SELECT tenant_id FROM (
        SELECT tenant_id FROM reservations
         WHERE status = 'active' AND expires_at <= %(now)s
           AND (%(tenants)s::text[] IS NULL OR tenant_id = ANY(%(tenants)s::text[]))
        UNION
        SELECT tenant_id FROM wallet_grants
         WHERE NOT expired AND expires_at <= %(now)s
           AND (%(tenants)s::text[] IS NULL OR tenant_id = ANY(%(tenants)s::text[]))
    ) u ORDER BY tenant_id LIMIT %(n)s
) t
"""

# Forget request_ids past their expiry, oldest first; keys another transaction holds are
# skipped (it is taking one over, or another sweeper is deleting it).
DELETE_EXPIRED_KEYS = """
WITH due AS (
    SELECT tenant_id, request_id FROM idempotency_keys WHERE expires_at <= %(now)s
     ORDER BY expires_at LIMIT %(n)s FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM idempotency_keys k USING due
     WHERE k.tenant_id = due.tenant_id AND k.request_id = due.request_id RETURNING 1
)
SELECT count(*) FROM gone
"""
