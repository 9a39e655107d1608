"""Model token prices, with their history (usage is priced by the price in effect then)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from billing_core import catalog
from billing_core.admin import audit
from billing_core.admin.pages import Page, check_limit, decode_cursor, page_of
from billing_core.db.quota_store import Conn
from billing_core.errors import InvalidRequest


@dataclass(frozen=True, slots=True)
class PriceView:
    provider: str
    model: str
    effective_from: datetime
    input_micros_per_million: int
    output_micros_per_million: int


_NAME_CHARS = 128


async def list_prices(
    conn: Conn,
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
        after_at = datetime.fromisoformat(after[2]) if after else None
    except (TypeError, ValueError):
        raise InvalidRequest("cursor is not one this API returned") from None
    cur = await conn.execute(
        "SELECT provider, model, effective_from, input_micros_per_million,"
        " output_micros_per_million FROM model_prices"
        " WHERE (%(provider)s::text IS NULL OR provider = %(provider)s)"
        " AND (%(model)s::text IS NULL OR model = %(model)s)"
        " AND (%(ap)s::text IS NULL OR (provider, model) > (%(ap)s, %(am)s)"
        "      OR ((provider, model) = (%(ap)s, %(am)s) AND effective_from < %(at)s))"
        " ORDER BY provider, model, effective_from DESC LIMIT %(n)s",
        {
            "provider": provider,
            "model": model,
            "ap": after[0] if after else None,
            "am": after[1] if after else None,
            "at": after_at,
            "n": limit + 1,
        },
    )
    rows = [PriceView(*r) for r in await cur.fetchall()]
    return page_of(rows, limit, lambda p: [p.provider, p.model, p.effective_from.isoformat()])


async def set_price(
    conn: Conn,
    actor: str,
    provider: str,
    model: str,
    input_micros_per_million: int,
    output_micros_per_million: int,
    effective_from: datetime,
    now: datetime,
) -> PriceView:
    for name, value in (("provider", provider), ("model", model)):
        if not value.strip() or len(value) > _NAME_CHARS:
            raise InvalidRequest(f"{name} must be 1-{_NAME_CHARS} characters")
    async with conn.transaction():
        cur = await conn.execute(
            "SELECT provider, model, effective_from, input_micros_per_million,"
            " output_micros_per_million FROM model_prices"
            " WHERE provider = %s AND model = %s AND effective_from = %s FOR UPDATE",
            (provider, model, effective_from),
        )
        row = await cur.fetchone()
        before = PriceView(*row) if row else None
        await catalog.set_model_price(
            conn,
            provider,
            model,
            input_micros_per_million,
            output_micros_per_million,
            effective_from,
        )
        after = PriceView(
            provider, model, effective_from, input_micros_per_million, output_micros_per_million
        )
        await audit.record(
            conn,
            actor=actor,
            action="price.set",
            entity_type="model_price",
            entity_id=f"{provider}/{model}",
            before=before,
            after=after,
            now=now,
        )
    return after
