"""Identifiers: a short prefix, then time-ordered hex so ids sort by creation."""

from __future__ import annotations

import secrets
from datetime import datetime


def new_id(prefix: str, at: datetime) -> str:
    return f"{prefix}_{int(at.timestamp() * 1000):012x}{secrets.token_hex(8)}"
