"""POST /webhooks/stripe: verify the signature on the raw body, store by event id, apply once.

400 and nothing stored for a bad signature or body; 200 for a duplicate; 500 (so the
provider retries) when applying failed — the failure is recorded on the event first."""

from __future__ import annotations

from typing import Any

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from billing_core.billing import webhooks
from billing_core.billing.provider import BillingAdapter, InvalidSignature
from billing_core.clock import Clock
from billing_core.db.unit_of_work import Database
from control_plane.api.problems import problem

MAX_WEBHOOK_BYTES = 512 * 1024
log = structlog.get_logger()


def stripe_webhook(clock: Clock) -> Any:
    async def endpoint(request: Request) -> Response:
        adapter: BillingAdapter = request.app.state.billing
        db: Database = request.app.state.db
        raw = await request.body()
        if len(raw) > MAX_WEBHOOK_BYTES:
            return problem(400, "the webhook body is too large", slug="invalid-webhook")
        try:
            event = adapter.parse_webhook(raw, request.headers.get("stripe-signature", ""))
        except InvalidSignature as exc:
            return problem(400, f"webhook rejected: {exc}", slug="invalid-webhook")
        try:
            status, duplicate = await webhooks.receive(db, adapter, event, clock.now())
        except Exception as exc:
            log.error("webhook_not_applied", event_id=event.event_id, error=type(exc).__name__)
            return problem(
                500, f"event {event.event_id} failed; it was recorded and will be retried"
            )
        return JSONResponse({"event_id": event.event_id, "status": status, "duplicate": duplicate})

    return endpoint
