"""The quota answers: windows as a caller sees them, decisions, commit and free results,
usage reports, and their JSON form (stored with a request_id and replayed)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

from billing_core.errors import QuotaError
from billing_core.rules.limits import Reason, WindowState
from billing_core.rules.resources import Period


@dataclass(frozen=True, slots=True)
class WindowView:
    period: Period
    limit: int
    used: int
    remaining: int
    resets_at: datetime | None
    state: WindowState
    unlimited: bool = False
    window_start: datetime | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "period": self.period.value,
            "limit": self.limit,
            "used": self.used,
            "remaining": self.remaining,
            "resets_at": None if self.resets_at is None else _iso(self.resets_at),
            "state": self.state.value,
            "unlimited": self.unlimited,
            "window_start": None if self.window_start is None else _iso(self.window_start),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> WindowView:
        return cls(
            period=Period(data["period"]),
            limit=data["limit"],
            used=data["used"],
            remaining=data["remaining"],
            resets_at=_dt(data["resets_at"]),
            state=WindowState(data["state"]),
            unlimited=data["unlimited"],
            window_start=_dt(data.get("window_start")),
        )


# a window's bounds, written into every answer stored for a replay: the same few instants
_iso = lru_cache(maxsize=4096)(datetime.isoformat)


def _dt(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to CheckAndConsume and Reserve."""

    allowed: bool
    reason: Reason
    windows: tuple[WindowView, ...]
    cost_micros: int = 0
    wallet_balance_micros: int = 0
    usage_record_id: str = ""
    replayed: bool = False
    message: str = ""
    upgrade_plan_id: str = ""
    reservation_id: str = ""
    expires_at: datetime | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "allowed": self.allowed,
            "reason": self.reason.value,
            "windows": [w.to_json() for w in self.windows],
            "cost_micros": self.cost_micros,
            "wallet_balance_micros": self.wallet_balance_micros,
            "usage_record_id": self.usage_record_id,
            "message": self.message,
            "upgrade_plan_id": self.upgrade_plan_id,
            "reservation_id": self.reservation_id,
            "expires_at": None if self.expires_at is None else self.expires_at.isoformat(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, replayed: bool) -> Decision:
        return cls(
            allowed=data["allowed"],
            reason=Reason(data["reason"]),
            windows=tuple(WindowView.from_json(w) for w in data["windows"]),
            cost_micros=data["cost_micros"],
            wallet_balance_micros=data["wallet_balance_micros"],
            usage_record_id=data["usage_record_id"],
            replayed=replayed,
            message=data["message"],
            upgrade_plan_id=data["upgrade_plan_id"],
            reservation_id=data["reservation_id"],
            expires_at=_dt(data["expires_at"]),
        )


@dataclass(frozen=True, slots=True)
class CommitResult:
    usage_record_id: str
    cost_micros: int
    windows: tuple[WindowView, ...]
    wallet_balance_micros: int
    replayed: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "usage_record_id": self.usage_record_id,
            "cost_micros": self.cost_micros,
            "windows": [w.to_json() for w in self.windows],
            "wallet_balance_micros": self.wallet_balance_micros,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, replayed: bool) -> CommitResult:
        return cls(
            usage_record_id=data["usage_record_id"],
            cost_micros=data["cost_micros"],
            windows=tuple(WindowView.from_json(w) for w in data["windows"]),
            wallet_balance_micros=data["wallet_balance_micros"],
            replayed=replayed,
        )


@dataclass(frozen=True, slots=True)
class FreeResult:
    windows: tuple[WindowView, ...]
    replayed: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"windows": [w.to_json() for w in self.windows]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, replayed: bool) -> FreeResult:
        return cls(tuple(WindowView.from_json(w) for w in data["windows"]), replayed=replayed)


@dataclass(frozen=True, slots=True)
class ReportResult:
    """The answer to ReportUsage: the usage record and the windows it was counted in."""

    usage_record_id: str
    cost_micros: int
    windows: tuple[WindowView, ...]
    replayed: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "usage_record_id": self.usage_record_id,
            "cost_micros": self.cost_micros,
            "windows": [w.to_json() for w in self.windows],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, replayed: bool) -> ReportResult:
        return cls(
            usage_record_id=data["usage_record_id"],
            cost_micros=data["cost_micros"],
            windows=tuple(WindowView.from_json(w) for w in data["windows"]),
            replayed=replayed,
        )


@dataclass(frozen=True, slots=True)
class ResourceWindows:
    resource: str
    windows: tuple[WindowView, ...]


@dataclass(frozen=True, slots=True)
class UsageReport:
    plan_id: str
    subscription_status: str
    trial_ends_at: datetime | None
    resources: tuple[ResourceWindows, ...]
    wallet_balance_micros: int


@dataclass(frozen=True, slots=True)
class Tidied:
    """What a Tidy (or a sweep) cleared."""

    reservations_released: int = 0
    grants_expired: int = 0

    def __add__(self, other: Tidied) -> Tidied:
        return Tidied(
            self.reservations_released + other.reservations_released,
            self.grants_expired + other.grants_expired,
        )


@dataclass(frozen=True, slots=True)
class GroupDecision:
    """The answer to an AdmitAllRequest: allowed when every member was, and then each
    counted; otherwise none counted, and each member's decision says whether it alone
    would have been allowed (its windows as they are) or why it was denied."""

    allowed: bool
    members: tuple[Decision, ...]


# the answer to each Request of a batch, or the error that request alone met
Result = (
    Decision | GroupDecision | CommitResult | bool | FreeResult | ReportResult | Tidied | QuotaError
)
