"""Resource names, periods and overage policies: the vocabulary every quota uses."""

from __future__ import annotations

import re
from enum import StrEnum

from billing_core.errors import InvalidRequest

BUILTIN_RESOURCES: frozenset[str] = frozenset(
    {
        "tokens",
        "messages",
        "agents",
        "bots",
        "boards",
        "companions",
        "files",
        "storage",
        "research_runs",
        "tool_calls",
        "media_processing",
    }
)
_CUSTOM = re.compile(r"^custom:[a-z0-9][a-z0-9_.-]{0,62}$")


class Period(StrEnum):
    DAILY = "daily"
    WEEKLY = "weekly"
    MONTHLY = "monthly"
    OVERALL = "overall"
    CUMULATIVE = "cumulative"


# Order in which windows of one resource are reported and locked.
PERIOD_ORDER: dict[Period, int] = {p: i for i, p in enumerate(Period)}


class Overage(StrEnum):
    BLOCK = "block"
    WALLET = "wallet"


def validate_resource(resource: str) -> str:
    """Return the resource name when it is well-formed, else raise InvalidRequest."""
    if resource in BUILTIN_RESOURCES or _CUSTOM.match(resource):
        return resource
    raise InvalidRequest(
        f"unknown resource {resource!r}: use one of {', '.join(sorted(BUILTIN_RESOURCES))} "
        "or custom:<name> (lower-case letters, digits, '_', '.', '-')"
    )


def parse_period(value: str) -> Period:
    try:
        return Period(value)
    except ValueError:
        raise InvalidRequest(
            f"unknown period {value!r}: use one of {', '.join(p.value for p in Period)}"
        ) from None
