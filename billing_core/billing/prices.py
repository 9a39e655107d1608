"""Model token prices, with their history (usage is priced by the price in effect then)."""

from __future__ import annotations

from datetime import datetime

from billing_core.billing import audit
from billing_core.billing.model import PriceView
from billing_core.billing.pages import Page, check_limit, decode_cursor, page_of
from billing_core.db.unit_of_work import UnitOfWork
from billing_core.errors import InvalidRequest

_NAME_CHARS = 128


async def list_prices(
    uow: UnitOfWork,
    *,
    limit: int,
    cursor: str | None,
    provider: str | None = None,
    model: str | None = None,
) -> Page[PriceView]:
    """Every price ever set, by provider, model, then newest first."""
    check_limit(limit)
    after = decode_cursor(cursor, 3)
    try:
        after_key = (after[0], after[1], datetime.fromisoformat(after[2])) if after else None
    except (TypeError, ValueError):
        raise InvalidRequest("cursor is not one this API returned") from None
    rows = await uow.prices.page(provider=provider, model=model, after=after_key, limit=limit + 1)
    return page_of(rows, limit, lambda p: [p.provider, p.model, p.effective_from.isoformat()])


async def set_price(uow: UnitOfWork, actor: str, price: PriceView, now: datetime) -> PriceView:
    """Set a model's price from `effective_from` on (replacing one set for that moment)."""
    for name, value in (("provider", price.provider), ("model", price.model)):
        if not value.strip() or len(value) > _NAME_CHARS:
            raise InvalidRequest(f"{name} must be 1-{_NAME_CHARS} characters")
    if price.input_micros_per_million < 0 or price.output_micros_per_million < 0:
        raise InvalidRequest("prices must be >= 0")
    before = await uow.prices.get(price.provider, price.model, price.effective_from, lock=True)
    await uow.prices.put(price)
    await audit.record(
        uow, actor=actor, action="price.set", entity_type="model_price",
        entity_id=f"{price.provider}/{price.model}", before=before, after=price, now=now,
    )  # fmt: skip
    return price
