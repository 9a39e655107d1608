"""Wallet rules: which grants pay a debit (soonest-expiring first), and what a grant is."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True, slots=True)
class LiveGrant:
    grant_id: str
    remaining_micros: int
    expires_at: datetime | None


def allocate_debit(grants: Sequence[LiveGrant], amount_micros: int) -> list[tuple[str, int]]:
    """Split a debit over grants in the given order (soonest-expiring first, never-expiring
    last); returns (grant_id, micros) pairs. The caller guarantees the grants cover it."""
    taken: list[tuple[str, int]] = []
    left = amount_micros
    for grant in grants:
        if left == 0:
            break
        take = min(grant.remaining_micros, left)
        if take > 0:
            taken.append((grant.grant_id, take))
            left -= take
    if left:
        raise ValueError(f"grants do not cover a debit of {amount_micros} micros")
    return taken
