"""Plans: the one canonical plan, created, changed and archived (never deleted)."""

from __future__ import annotations

import dataclasses
import re
from datetime import datetime
from typing import Any

from billing_core.billing import audit
from billing_core.billing.model import PlanSpec, PlanView
from billing_core.billing.pages import MAX_LIMIT, Page, check_limit, decode_cursor, page_of
from billing_core.db.unit_of_work import UnitOfWork
from billing_core.errors import Conflict, InvalidRequest, NotFound
from billing_core.ids import new_id

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
# what a plan's price is made of: changing any of these needs a new provider price
_MONEY = ("price_cents", "currency", "interval")


def check_id(kind: str, value: str) -> str:
    if not _ID.match(value):
        raise InvalidRequest(f"{kind} must be 1-64 characters of letters, digits, _ . : -")
    return value


def require_open(plan: PlanView) -> None:
    """An archived plan takes no new subscribers (its subscribers keep it)."""
    if not plan.spec.active:
        raise Conflict(f"plan {plan.plan_id!r} is archived and takes no new subscribers")


async def get_plan(uow: UnitOfWork, plan_id: str, *, lock: bool = False) -> PlanView:
    found = await uow.plans.get(plan_id, lock=lock)
    if found is None:
        raise NotFound(f"unknown plan {plan_id!r}")
    return found


async def list_plans(
    uow: UnitOfWork, *, limit: int, cursor: str | None, active: bool | None = None
) -> Page[PlanView]:
    check_limit(limit)
    after = decode_cursor(cursor, 1)
    views = await uow.plans.page(after=after[0] if after else None, active=active, limit=limit + 1)
    return page_of(views, limit, lambda v: [v.plan_id])


async def all_plans(uow: UnitOfWork, *, active: bool | None = None) -> list[PlanView]:
    """Every plan (or every active or archived one), page by page, in id order."""
    found: list[PlanView] = []
    cursor = None
    while True:
        page = await list_plans(uow, limit=MAX_LIMIT, cursor=cursor, active=active)
        found += page.items
        if (cursor := page.next_cursor) is None:
            return found


async def create_plan(
    uow: UnitOfWork, actor: str, spec: PlanSpec, now: datetime, plan_id: str | None = None
) -> PlanView:
    spec.validate()
    plan_id = check_id("plan_id", plan_id) if plan_id else new_id("plan", now)
    await uow.plans.insert(plan_id, spec, now)
    if spec.stripe_price_id:
        await uow.plans.remember_stripe_price(plan_id, spec.stripe_price_id)
    view = await get_plan(uow, plan_id)
    await audit.record(
        uow, actor=actor, action="plan.create", entity_type="plan", entity_id=plan_id,
        before=None, after=view, now=now,
    )  # fmt: skip
    return view


async def update_plan(
    uow: UnitOfWork, actor: str, plan_id: str, changes: dict[str, Any], now: datetime
) -> PlanView:
    """Change the listed fields (quotas / wallet_grants replace the whole list)."""
    unknown = set(changes) - {f.name for f in dataclasses.fields(PlanSpec)}
    if unknown:
        raise InvalidRequest(f"unknown plan fields: {', '.join(sorted(unknown))}")
    before = await get_plan(uow, plan_id, lock=True)
    repriced = any(k in changes and changes[k] != getattr(before.spec, k) for k in _MONEY)
    if repriced and "stripe_price_id" not in changes:
        # provider prices never change: the next checkout creates a new one, while
        # subscribers stay on the old one (still linked to the plan)
        changes = {**changes, "stripe_price_id": None}
    spec = dataclasses.replace(before.spec, **changes)
    spec.validate()
    if before.subscribers and spec.interval != before.spec.interval:
        raise Conflict("the interval of a plan with subscribers cannot change")
    await uow.plans.update(
        plan_id, spec, now, children="quotas" in changes or "wallet_grants" in changes
    )
    if changes.get("stripe_price_id"):
        await uow.plans.remember_stripe_price(plan_id, changes["stripe_price_id"])
    after = await get_plan(uow, plan_id)
    await audit.record(
        uow, actor=actor, action="plan.update", entity_type="plan", entity_id=plan_id,
        before=before, after=after, now=now,
    )  # fmt: skip
    return after


async def archive_plan(uow: UnitOfWork, actor: str, plan_id: str, now: datetime) -> PlanView:
    """Archived plans take no new subscribers; current subscribers keep their quotas."""
    before = await get_plan(uow, plan_id, lock=True)
    if not before.spec.active:
        return before
    await uow.plans.update(plan_id, dataclasses.replace(before.spec, active=False), now,
                           children=False)  # fmt: skip
    after = await get_plan(uow, plan_id)
    await audit.record(
        uow, actor=actor, action="plan.archive", entity_type="plan", entity_id=plan_id,
        before=before, after=after, now=now,
    )  # fmt: skip
    return after
