"""Plans with their quotas and wallet grants, and the provider prices that sell them."""

from __future__ import annotations

from typing import Any

from psycopg import AsyncConnection
from psycopg import errors as pg_errors

from billing_core.billing.model import GrantSpec, PlanSpec, PlanView
from billing_core.billing.provider import PriceRef
from billing_core.errors import Conflict
from billing_core.rules.limits import Quota
from billing_core.rules.resources import Overage, Period

_COLUMNS = (
    'plan_id, name, description, price_cents, currency, "interval", stripe_price_id, active,'
    " trial, trial_days, priority, enterprise, unlimited, version, created_at, updated_at,"
    " (SELECT count(*) FROM subscriptions s WHERE s.plan_id = p.plan_id AND s.is_current),"
    ' (SELECT coalesce(json_agg(json_build_array(q.resource, q.period, q."limit", q.warn_at,'
    "   q.overage) ORDER BY q.resource, q.period), '[]') FROM plan_quotas q"
    "   WHERE q.plan_id = p.plan_id),"
    " (SELECT coalesce(json_agg(json_build_array(g.grant_on, g.amount_micros,"
    "   g.expires_after_days) ORDER BY g.grant_on), '[]') FROM plan_wallet_grants g"
    "   WHERE g.plan_id = p.plan_id)"
)
# the plan's columns that PlanSpec holds, in its order (quotas and grants live in tables of
# their own)
_SPEC_COLUMNS = (
    'name, description, price_cents, currency, "interval", stripe_price_id, active, trial,'
    " trial_days, priority, enterprise, unlimited"
)


def _view(row: tuple[Any, ...]) -> PlanView:
    plan_id, name, description, price, currency, interval, stripe_price, active = row[:8]
    trial, trial_days, priority, enterprise, unlimited, version, created, updated = row[8:16]
    subscribers, quotas, grants = row[16:]
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
        quotas=tuple(
            Quota(res, Period(period), limit, tuple(warn_at), Overage(overage))
            for res, period, limit, warn_at, overage in quotas
        ),
        wallet_grants=tuple(GrantSpec(on, amount, days) for on, amount, days in grants),
    )
    return PlanView(plan_id, spec, version, subscribers, created, updated)


def _spec_values(spec: PlanSpec) -> tuple[Any, ...]:
    return (
        spec.name, spec.description, spec.price_cents, spec.currency, spec.interval,
        spec.stripe_price_id, spec.active, spec.trial, spec.trial_days, spec.priority,
        spec.enterprise, spec.unlimited,
    )  # fmt: skip


class PlanRepository:
    def __init__(self, conn: AsyncConnection[Any]) -> None:
        self._conn = conn

    async def get(self, plan_id: str, *, lock: bool = False) -> PlanView | None:
        sql = f"SELECT {_COLUMNS} FROM plans p WHERE plan_id = %s"
        cur = await self._conn.execute(sql + (" FOR UPDATE" if lock else ""), (plan_id,))
        row = await cur.fetchone()
        return None if row is None else _view(row)

    async def wallet_grants(self, plan_id: str) -> tuple[GrantSpec, ...]:
        """The plan's wallet grants (none for an unknown plan): plans' tables only, where a
        plan's view also counts its subscribers across every tenant."""
        cur = await self._conn.execute(
            "SELECT grant_on, amount_micros, expires_after_days FROM plan_wallet_grants"
            " WHERE plan_id = %s ORDER BY grant_on",
            (plan_id,),
        )
        return tuple(GrantSpec(on, amount, days) for on, amount, days in await cur.fetchall())

    async def page(self, *, after: str | None, active: bool | None, limit: int) -> list[PlanView]:
        """Plans by id after `after`, at most `limit`."""
        cur = await self._conn.execute(
            f"SELECT {_COLUMNS} FROM plans p"
            " WHERE (%(after)s::text IS NULL OR plan_id > %(after)s)"
            " AND (%(active)s::boolean IS NULL OR active = %(active)s)"
            " ORDER BY plan_id LIMIT %(n)s",
            {"after": after, "active": active, "n": limit},
        )
        return [_view(row) for row in await cur.fetchall()]

    async def insert(self, plan_id: str, spec: PlanSpec, now: Any) -> None:
        """A new plan with its quotas and grants; Conflict when the id or the active name
        is taken."""
        try:
            async with self._conn.transaction():  # a savepoint: the caller's stays usable
                await self._conn.execute(
                    f"INSERT INTO plans (plan_id, {_SPEC_COLUMNS}, created_at, updated_at)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    (plan_id, *_spec_values(spec), now, now),
                )
                await self._write_children(plan_id, spec)
        except pg_errors.UniqueViolation as exc:
            raise Conflict(
                f"a plan with id {plan_id!r} or active name {spec.name!r} exists"
            ) from exc

    async def update(self, plan_id: str, spec: PlanSpec, now: Any, *, children: bool) -> None:
        """Write the plan's fields (and its quotas and grants when `children`); Conflict
        when another active plan has its name."""
        try:
            async with self._conn.transaction():
                await self._conn.execute(
                    "UPDATE plans SET name = %s, description = %s, price_cents = %s,"
                    ' currency = %s, "interval" = %s, stripe_price_id = %s, active = %s,'
                    " trial = %s, trial_days = %s, priority = %s, enterprise = %s,"
                    " unlimited = %s, version = version + 1, updated_at = %s"
                    " WHERE plan_id = %s",
                    (*_spec_values(spec), now, plan_id),
                )
                if children:
                    await self._conn.execute(
                        "DELETE FROM plan_quotas WHERE plan_id = %s", (plan_id,)
                    )
                    await self._conn.execute(
                        "DELETE FROM plan_wallet_grants WHERE plan_id = %s", (plan_id,)
                    )
                    await self._write_children(plan_id, spec)
        except pg_errors.UniqueViolation as exc:
            raise Conflict(f"another active plan is named {spec.name!r}") from exc

    async def _write_children(self, plan_id: str, spec: PlanSpec) -> None:
        for q in spec.quotas:
            await self._conn.execute(
                'INSERT INTO plan_quotas (plan_id, resource, period, "limit", warn_at, overage)'
                " VALUES (%s, %s, %s, %s, %s, %s)",
                (plan_id, q.resource, q.period.value, q.limit, list(q.warn_at), q.overage.value),
            )
        for g in spec.wallet_grants:
            await self._conn.execute(
                "INSERT INTO plan_wallet_grants (plan_id, grant_on, amount_micros,"
                " expires_after_days) VALUES (%s, %s, %s, %s)",
                (plan_id, g.on, g.amount_micros, g.expires_after_days),
            )

    async def remember_stripe_price(self, plan_id: str, price_id: str) -> None:
        """Keep the price → plan link for good (subscribers stay on old prices)."""
        cur = await self._conn.execute(
            "INSERT INTO plan_stripe_prices (stripe_price_id, plan_id) VALUES (%s, %s)"
            " ON CONFLICT (stripe_price_id) DO UPDATE"
            " SET stripe_price_id = EXCLUDED.stripe_price_id RETURNING plan_id",
            (price_id, plan_id),
        )
        row = await cur.fetchone()
        if row is None or row[0] != plan_id:
            raise Conflict(f"Stripe price {price_id!r} already belongs to plan {row and row[0]!r}")

    async def for_stripe_price(self, price_id: str) -> str | None:
        """The plan a provider price sells (now or ever)."""
        cur = await self._conn.execute(
            "SELECT plan_id FROM plan_stripe_prices WHERE stripe_price_id = %s", (price_id,)
        )
        row = await cur.fetchone()
        return None if row is None else str(row[0])

    async def lock_provider_price(self, plan_id: str) -> PriceRef | None:
        """The product and price that sell the plan now, locked."""
        cur = await self._conn.execute(
            "SELECT stripe_product_id, stripe_price_id FROM plans WHERE plan_id = %s FOR UPDATE",
            (plan_id,),
        )
        row = await cur.fetchone()
        return PriceRef(row[0] or "", row[1]) if row and row[1] else None

    async def set_provider_price(self, plan_id: str, ref: PriceRef) -> None:
        await self._conn.execute(
            "UPDATE plans SET stripe_product_id = %s, stripe_price_id = %s WHERE plan_id = %s",
            (ref.product_id, ref.price_id, plan_id),
        )
        await self.remember_stripe_price(plan_id, ref.price_id)
