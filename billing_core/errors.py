"""The one error hierarchy, raised by the core and mapped once per transport."""

from __future__ import annotations


class QuotaError(Exception):
    """Base of every error the domain raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(QuotaError):
    """The caller sent something malformed; nothing was written."""


class NotFound(QuotaError):
    """A tenant, reservation, plan or price that does not exist."""


class Conflict(QuotaError):
    """The request contradicts the current state (duplicate name, second subscription)."""


class Unauthenticated(QuotaError):
    """Missing or wrong credentials."""


class Forbidden(QuotaError):
    """Known credentials that may not do this (a read-only key asked for a change)."""


class Unavailable(QuotaError):
    """A dependency (the database) cannot be reached; retrying may help."""


ALL_ERRORS: tuple[type[QuotaError], ...] = (
    InvalidRequest,
    NotFound,
    Conflict,
    Unauthenticated,
    Forbidden,
    Unavailable,
)
