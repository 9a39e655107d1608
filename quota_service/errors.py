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


def status_for(error: QuotaError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in STATUS_FOR:
            return STATUS_FOR[cls]
    return grpc.StatusCode.INTERNAL
