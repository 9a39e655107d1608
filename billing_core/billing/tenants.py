"""Tenants and their quota overrides."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from billing_core.billing import audit
from billing_core.billing.model import TenantView, validate_quotas
from billing_core.billing.pages import Page, check_limit, decode_cursor, page_of
from billing_core.db.unit_of_work import UnitOfWork
from billing_core.errors import Conflict, InvalidRequest, NotFound
from billing_core.rules.limits import Quota
from billing_core.rules.periods import tenant_zone


async def get_tenant(uow: UnitOfWork, tenant_id: str, *, lock: bool = False) -> TenantView:
    found = await uow.tenants.get(tenant_id, lock=lock)
    if found is None:
        raise NotFound(f"unknown tenant {tenant_id!r}")
    return found


async def list_tenants(uow: UnitOfWork, *, limit: int, cursor: str | None) -> Page[TenantView]:
    check_limit(limit)
    after = decode_cursor(cursor, 1)
    rows = await uow.tenants.page(after=after[0] if after else None, limit=limit + 1)
    return page_of(rows, limit, lambda t: [t.tenant_id])


async def search_tenants(
    uow: UnitOfWork, text: str, *, limit: int, cursor: str | None
) -> Page[TenantView]:
    """Tenants whose id, name or email contains the text."""
    check_limit(limit)
    after = decode_cursor(cursor, 1)
    rows = await uow.tenants.search(text.strip(), after=after[0] if after else None,
                                    limit=limit + 1)  # fmt: skip
    return page_of(rows, limit, lambda t: [t.tenant_id])


async def grant_billing_access(
    uow: UnitOfWork, actor: str, tenant_id: str, expires_at: datetime, now: datetime
) -> TenantView:
    """Someone may see the tenant's billing pages until `expires_at` (a billing link the
    platform hands its user): the tenant must exist, and the grant is in the audit log."""
    tenant = await get_tenant(uow, tenant_id)
    await audit.record_tenant(
        uow,
        actor,
        "billing_link.create",
        tenant_id,
        None,
        {"expires_at": expires_at.isoformat()},
        now,
    )
    return tenant


async def create_tenant(
    uow: UnitOfWork,
    actor: str,
    tenant_id: str,
    name: str,
    now: datetime,
    *,
    email: str = "",
    timezone: str = "UTC",
) -> TenantView:
    if not tenant_id or len(tenant_id) > 128:
        raise InvalidRequest("tenant_id is required (at most 128 characters)")
    tenant_zone(timezone)
    await uow.tenants.insert(tenant_id, name, email, timezone, now)
    view = await get_tenant(uow, tenant_id)
    await audit.record_tenant(uow, actor, "tenant.create", tenant_id, None, view, now)
    return view


async def get_overrides(uow: UnitOfWork, tenant_id: str) -> tuple[Quota, ...]:
    await get_tenant(uow, tenant_id)
    return await uow.tenants.overrides(tenant_id)


async def set_overrides(
    uow: UnitOfWork, actor: str, tenant_id: str, quotas: Sequence[Quota], now: datetime
) -> tuple[Quota, ...]:
    """Replace the tenant's overrides; they apply only while the tenant is on an
    enterprise plan, so setting them for anyone else is refused rather than ignored."""
    await get_tenant(uow, tenant_id, lock=True)
    current = await uow.tenants.current_subscription(tenant_id)
    if quotas and (current is None or not current.enterprise):
        raise Conflict(
            f"tenant {tenant_id!r} is not on an enterprise plan; overrides would not apply"
        )
    validate_quotas(tuple(quotas))
    before = await uow.tenants.overrides(tenant_id)
    await uow.tenants.replace_overrides(tenant_id, quotas)
    after = await uow.tenants.overrides(tenant_id)
    await audit.record_tenant(
        uow, actor, "overrides.set", tenant_id, {"quotas": before}, {"quotas": after}, now
    )
    return after
