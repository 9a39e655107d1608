"""RFC 9457 problem+json responses: every error of the API goes through here."""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from billing_core.errors import (
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFound,
    QuotaError,
    Unauthenticated,
    Unavailable,
)

PROBLEM_JSON = "application/problem+json"

# one mapping, tested to cover every error of the domain
STATUS_FOR: dict[type[QuotaError], tuple[int, str, str]] = {
    InvalidRequest: (422, "invalid-request", "Invalid request"),
    NotFound: (404, "not-found", "Not found"),
    Conflict: (409, "conflict", "Conflict"),
    Unauthenticated: (401, "unauthenticated", "Unauthenticated"),
    Forbidden: (403, "forbidden", "Forbidden"),
    Unavailable: (503, "unavailable", "Service unavailable"),
}
TITLES = {
    400: ("malformed-json", "Malformed JSON"),
    401: ("unauthenticated", "Unauthenticated"),
    403: ("forbidden", "Forbidden"),
    404: ("not-found", "Not found"),
    405: ("method-not-allowed", "Method not allowed"),
    406: ("not-acceptable", "Not acceptable"),
    409: ("conflict", "Conflict"),
    415: ("unsupported-media-type", "Unsupported media type"),
    422: ("validation-error", "Invalid request body or parameters"),
    429: ("too-many-requests", "Too many requests"),
    500: ("internal-error", "Internal error"),
    503: ("unavailable", "Service unavailable"),
}


def problem(
    status: int,
    detail: str,
    *,
    slug: str | None = None,
    title: str | None = None,
    errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    default_slug, default_title = TITLES.get(status, ("error", "Error"))
    body: dict[str, Any] = {
        "type": f"/problems/{slug or default_slug}",
        "title": title or default_title,
        "status": status,
        "detail": detail,
    }
    if errors is not None:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def from_error(exc: QuotaError) -> JSONResponse:
    for cls in type(exc).__mro__:
        if cls in STATUS_FOR:
            status, slug, title = STATUS_FOR[cls]
            return problem(status, exc.message, slug=slug, title=title)
    return problem(500, "internal error")  # pragma: no cover - every error is mapped


def field_errors(errors: list[Any]) -> list[dict[str, Any]]:
    """pydantic's errors as [{field, message}] with a dotted path."""
    return [
        {"field": ".".join(str(p) for p in e["loc"]) or "(body)", "message": e["msg"]}
        for e in errors
    ]
