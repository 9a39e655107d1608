"""Model token prices with their history (usage is priced by the price in effect then)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from psycopg import AsyncConnection

from billing_core.billing.model import PriceView

_COLUMNS = "provider, model, effective_from, input_micros_per_million, output_micros_per_million"


class PriceRepository:
    def __init__(self, conn: AsyncConnection[Any]) -> None:
        self._conn = conn

    async def page(
        self,
        *,
        provider: str | None,
        model: str | None,
        after: tuple[str, str, datetime] | None,
        limit: int,
    ) -> list[PriceView]:
        """By provider, model, then newest first, after the price `after`."""
        cur = await self._conn.execute(
            f"SELECT {_COLUMNS} FROM model_prices"
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
                "at": after[2] if after else None,
                "n": limit,
            },
        )
        return [PriceView(*r) for r in await cur.fetchall()]

    async def get(
        self, provider: str, model: str, effective_from: datetime, *, lock: bool = False
    ) -> PriceView | None:
        cur = await self._conn.execute(
            f"SELECT {_COLUMNS} FROM model_prices"
            " WHERE provider = %s AND model = %s AND effective_from = %s"
            + (" FOR UPDATE" if lock else ""),
            (provider, model, effective_from),
        )
        row = await cur.fetchone()
        return None if row is None else PriceView(*row)

    async def put(self, price: PriceView) -> None:
        await self._conn.execute(
            f"INSERT INTO model_prices ({_COLUMNS}) VALUES (%s, %s, %s, %s, %s)"
            " ON CONFLICT (provider, model, effective_from) DO UPDATE SET"
            " input_micros_per_million = EXCLUDED.input_micros_per_million,"
            " output_micros_per_million = EXCLUDED.output_micros_per_million",
            (
                price.provider,
                price.model,
                price.effective_from,
                price.input_micros_per_million,
                price.output_micros_per_million,
            ),
        )
