"""POST /webhooks/stripe: verify the signature on the raw body, store by event id, apply once.

413 for a body over 512 KiB and 400 for a bad signature or body, nothing stored; 200 for a
duplicate; 500 (so the provider retries) when applying failed — the failure is recorded on
the event first and counted in `billing_webhook_events_failed_total` by event type."""

from __future__ import annotations

from typing import Any

import structlog
from prometheus_client import Counter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from billing_core.billing import webhooks
from billing_core.billing.provider import BillingAdapter, InvalidSignature
from billing_core.clock import Clock
from billing_core.db.unit_of_work import Database
from control_plane.api.problems import problem

MAX_WEBHOOK_BYTES = 512 * 1024
log = structlog.get_logger()


async def _body(request: Request) -> bytes | None:
    """The raw body, or None as soon as it is longer than MAX_WEBHOOK_BYTES."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_WEBHOOK_BYTES:
        return None
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_WEBHOOK_BYTES:
            return None
    return bytes(raw)


def stripe_webhook(clock: Clock, failed: Counter) -> Any:
    async def endpoint(request: Request) -> Response:
        adapter: BillingAdapter = request.app.state.billing
        db: Database = request.app.state.db
        raw = await _body(request)
        if raw is None:
            return problem(
                413,
                f"the webhook body is larger than {MAX_WEBHOOK_BYTES} bytes",
                slug="webhook-too-large",
                title="Webhook too large",
            )
        try:
            event = adapter.parse_webhook(raw, request.headers.get("stripe-signature", ""))
        except InvalidSignature as exc:
            return problem(400, f"webhook rejected: {exc}", slug="invalid-webhook")
        try:
            status, duplicate = await webhooks.receive(db, adapter, event, clock.now())
        except Exception as exc:
            failed.labels(type=event.type).inc()
            log.error("webhook_not_applied", event_id=event.event_id, error=type(exc).__name__)
            return problem(
                500, f"event {event.event_id} failed; it was recorded and will be retried"
            )
        return JSONResponse({"event_id": event.event_id, "status": status, "duplicate": duplicate})

    return endpoint
