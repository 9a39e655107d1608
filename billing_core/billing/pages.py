"""Opaque cursors for keyset pagination: the last row's sort key, base64-encoded JSON."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from billing_core.errors import InvalidRequest, NotFound

T = TypeVar("T")
MAX_LIMIT = 500
# a cursor addresses a page; one the API never returned addresses none (404)
UNKNOWN_CURSOR = "no page at this cursor: it is not one this API returned"


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    items: Sequence[T]
    next_cursor: str | None


def encode_cursor(key: Sequence[Any]) -> str:
    raw = json.dumps(list(key), separators=(",", ":"), default=str).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str | None, size: int) -> list[Any] | None:
    """The sort key a cursor carries, or None for the first page."""
    if not cursor:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        key = json.loads(raw)
    except (binascii.Error, ValueError):
        raise NotFound(UNKNOWN_CURSOR) from None
    if not isinstance(key, list) or len(key) != size:
        raise NotFound(UNKNOWN_CURSOR)
    return key


def check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidRequest(f"limit must be between 1 and {MAX_LIMIT}")
    return limit


def page_of(rows: Sequence[T], limit: int, key: Any) -> Page[T]:
    """Rows were fetched with limit + 1: the extra one says whether another page exists."""
    if len(rows) <= limit:
        return Page(rows, None)
    kept = rows[:limit]
    return Page(kept, encode_cursor(key(kept[-1])))
