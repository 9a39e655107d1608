"""The one mapping from the domain's errors to gRPC status codes."""

from __future__ import annotations

import grpc

from billing_core.errors import (
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFound,
    QuotaError,
    Unauthenticated,
    Unavailable,
)

STATUS_FOR: dict[type[QuotaError], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    Conflict: grpc.StatusCode.FAILED_PRECONDITION,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    Forbidden: grpc.StatusCode.PERMISSION_DENIED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
}


MAX_DETAILS = 1000  # gRPC carries details in a header: a long one would end the stream


def details_for(error: QuotaError) -> str:
    """The error's sentence, cut short when an echoed input made it long."""
    message = error.message
    return message if len(message) <= MAX_DETAILS else message[: MAX_DETAILS - 1] + "…"


def status_for(error: QuotaError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in STATUS_FOR:
            return STATUS_FOR[cls]
    return grpc.StatusCode.INTERNAL
