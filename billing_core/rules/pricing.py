"""Token pricing: cost of a request from the model price in effect when it happened."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from billing_core.errors import InvalidRequest, NotFound

MICROS_PER_UNIT = 1_000_000
TOKENS_PER_PRICE_UNIT = 1_000_000


@dataclass(frozen=True, slots=True)
class TokenUsage:
    provider: str
    model: str
    input_tokens: int
    output_tokens: int

    def validate(self) -> TokenUsage:
        if not self.provider or not self.model:
            raise InvalidRequest("tokens.provider and tokens.model are required with tokens")
        if self.input_tokens < 0 or self.output_tokens < 0:
            raise InvalidRequest("tokens.input_tokens and tokens.output_tokens must be >= 0")
        if "\x00" in self.provider + self.model:
            raise InvalidRequest("tokens.provider and tokens.model must not contain NUL characters")
        return self


@dataclass(frozen=True, slots=True)
class ModelPrice:
    provider: str
    model: str
    effective_from: datetime
    input_micros_per_million: int
    output_micros_per_million: int


def cost_micros(usage: TokenUsage, price: ModelPrice) -> int:
    """Exact cost in micros, rounded up to a whole micro."""
    numerator = (
        usage.input_tokens * price.input_micros_per_million
        + usage.output_tokens * price.output_micros_per_million
    )
    return -(-numerator // TOKENS_PER_PRICE_UNIT)


def missing_price(provider: str, model: str, at: datetime) -> NotFound:
    return NotFound(
        f"no price for {provider}/{model} at {at.isoformat()}; "
        f"set one with PUT /v1/model-prices/{provider}/{model}"
    )
