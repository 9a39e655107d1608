"""Plans: the one canonical plan, created, changed and archived (never deleted)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import errors as pg_errors

from billing_core import catalog
from billing_core.admin import audit
from billing_core.admin.pages import Page, check_limit, decode_cursor, page_of
from billing_core.catalog import GrantSpec, PlanSpec
from billing_core.db.quota_store import Conn
from billing_core.errors import Conflict, InvalidRequest, NotFound
from billing_core.limits import Quota
from billing_core.resources import Overage, Period

_PLAN_COLUMNS = (
    'plan_id, name, description, price_cents, currency, "interval", stripe_price_id, active,'
    " trial, trial_days, priority, enterprise, unlimited, version, created_at, updated_at,"
    " (SELECT count(*) FROM subscriptions s WHERE s.plan_id = p.plan_id AND s.is_current)"
)


@dataclass(frozen=True, slots=True)
class PlanView:
    plan_id: str
    spec: PlanSpec
    version: int
    subscribers: int
    created_at: datetime
    updated_at: datetime


async def _quotas(conn: Conn, plan_id: str) -> tuple[Quota, ...]:
    cur = await conn.execute(
        'SELECT resource, period, "limit", warn_at, overage FROM plan_quotas WHERE plan_id = %s'
        " ORDER BY resource, period",
        (plan_id,),
    )
    return tuple(
        Quota(res, Period(period), limit, tuple(warn_at), Overage(overage))
        for res, period, limit, warn_at, overage in await cur.fetchall()
    )


async def _grants(conn: Conn, plan_id: str) -> tuple[GrantSpec, ...]:
    cur = await conn.execute(
        "SELECT grant_on, amount_micros, expires_after_days FROM plan_wallet_grants"
        " WHERE plan_id = %s ORDER BY grant_on",
        (plan_id,),
    )
    return tuple(GrantSpec(on, amount, days) for on, amount, days in await cur.fetchall())


async def _view(conn: Conn, row: tuple[Any, ...]) -> PlanView:
    plan_id, name, description, price, currency, interval, stripe_price, active = row[:8]
    trial, trial_days, priority, enterprise, unlimited, version, created, updated = row[8:16]
    subs = row[16]
    spec = PlanSpec(
        name=name,
        description=description,
        price_cents=price,
        currency=currency,
        interval=interval,
        stripe_price_id=stripe_price,
        active=active,
        trial=trial,
        trial_days=trial_days,
        priority=priority,
        enterprise=enterprise,
        unlimited=unlimited,
        quotas=await _quotas(conn, plan_id),
        wallet_grants=await _grants(conn, plan_id),
    )
    return PlanView(plan_id, spec, version, subs, created, updated)


async def get_plan(conn: Conn, plan_id: str, *, lock: bool = False) -> PlanView:
    sql = f"SELECT {_PLAN_COLUMNS} FROM plans p WHERE plan_id = %s"
    cur = await conn.execute(sql + (" FOR UPDATE" if lock else ""), (plan_id,))
    row = await cur.fetchone()
    if row is None:
        raise NotFound(f"unknown plan {plan_id!r}")
    return await _view(conn, row)


async def list_plans(
    conn: Conn, *, limit: int, cursor: str | None, active: bool | None = None
) -> Page[PlanView]:
    check_limit(limit)
    after = decode_cursor(cursor, 1)
    cur = await conn.execute(
        f"SELECT {_PLAN_COLUMNS} FROM plans p"
        " WHERE (%(after)s::text IS NULL OR plan_id > %(after)s)"
        " AND (%(active)s::boolean IS NULL OR active = %(active)s)"
        " ORDER BY plan_id LIMIT %(n)s",
        {"after": after[0] if after else None, "active": active, "n": limit + 1},
    )
    views = [await _view(conn, row) for row in await cur.fetchall()]
    return page_of(views, limit, lambda v: [v.plan_id])


async def create_plan(
    conn: Conn, actor: str, spec: PlanSpec, now: datetime, plan_id: str | None = None
) -> PlanView:
    async with conn.transaction():
        new_id = await catalog.create_plan(conn, spec, now, plan_id)
        view = await get_plan(conn, new_id)
        await audit.record(
            conn,
            actor=actor,
            action="plan.create",
            entity_type="plan",
            entity_id=new_id,
            before=None,
            after=view,
            now=now,
        )
    return view


async def update_plan(
    conn: Conn, actor: str, plan_id: str, changes: dict[str, Any], now: datetime
) -> PlanView:
    """Change the listed fields (quotas / wallet_grants replace the whole list)."""
    unknown = set(changes) - {f.name for f in dataclasses.fields(PlanSpec)}
    if unknown:
        raise InvalidRequest(f"unknown plan fields: {', '.join(sorted(unknown))}")
    try:
        async with conn.transaction():
            before = await get_plan(conn, plan_id, lock=True)
            money = ("price_cents", "currency", "interval")
            repriced = any(k in changes and changes[k] != getattr(before.spec, k) for k in money)
            if repriced and "stripe_price_id" not in changes:
                # Stripe prices never change: the next checkout creates a new one, while
                # subscribers stay on the old one (still linked in plan_stripe_prices)
                changes = {**changes, "stripe_price_id": None}
            spec = dataclasses.replace(before.spec, **changes)
            spec.validate()
            if (
                before.subscribers
                and "interval" in changes
                and spec.interval != before.spec.interval
            ):
                raise Conflict("the interval of a plan with subscribers cannot change")
            await conn.execute(
                "UPDATE plans SET name = %s, description = %s, price_cents = %s, currency = %s,"
                ' "interval" = %s, stripe_price_id = %s, active = %s, trial = %s, trial_days = %s,'
                " priority = %s, enterprise = %s, unlimited = %s, version = version + 1,"
                " updated_at = %s WHERE plan_id = %s",
                (
                    spec.name,
                    spec.description,
                    spec.price_cents,
                    spec.currency,
                    spec.interval,
                    spec.stripe_price_id,
                    spec.active,
                    spec.trial,
                    spec.trial_days,
                    spec.priority,
                    spec.enterprise,
                    spec.unlimited,
                    now,
                    plan_id,
                ),
            )
            if changes.get("stripe_price_id"):
                await catalog.remember_stripe_price(conn, plan_id, changes["stripe_price_id"])
            if "quotas" in changes or "wallet_grants" in changes:
                await conn.execute("DELETE FROM plan_quotas WHERE plan_id = %s", (plan_id,))
                await conn.execute("DELETE FROM plan_wallet_grants WHERE plan_id = %s", (plan_id,))
                await catalog.write_plan_children(conn, plan_id, spec)
            after = await get_plan(conn, plan_id)
            await audit.record(
                conn,
                actor=actor,
                action="plan.update",
                entity_type="plan",
                entity_id=plan_id,
                before=before,
                after=after,
                now=now,
            )
    except pg_errors.UniqueViolation as exc:
        raise Conflict(f"another active plan is named {changes.get('name')!r}") from exc
    return after


async def archive_plan(conn: Conn, actor: str, plan_id: str, now: datetime) -> PlanView:
    """Archived plans take no new subscribers; current subscribers keep their quotas."""
    async with conn.transaction():
        before = await get_plan(conn, plan_id, lock=True)
        if not before.spec.active:
            return before
        await conn.execute(
            "UPDATE plans SET active = false, version = version + 1, updated_at = %s"
            " WHERE plan_id = %s",
            (now, plan_id),
        )
        after = await get_plan(conn, plan_id)
        await audit.record(
            conn,
            actor=actor,
            action="plan.archive",
            entity_type="plan",
            entity_id=plan_id,
            before=before,
            after=after,
            now=now,
        )
    return after
